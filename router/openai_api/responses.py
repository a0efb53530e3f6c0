"""GenerateResponse messages → OpenAI's JSON: whole responses, stream chunks, usage and logprobs.

`Answer` folds the messages of one request as they arrive (checking the index contract) and
renders them for the endpoint of its ParsedRequest: `text_completion` / `chat.completion`
objects, or their chunks when streaming. Token strings in logprobs are each token decoded
alone (special tokens by name); a logprob of -inf is sent as -9999.0, as JSON has no infinity.
"""
from __future__ import annotations

import math
import time

import grpc

from router.request.dispatch import RouteError
from router.openai_api.requests import ParsedRequest
from router.openai_api.tools import extract, maybe_call
from services.engine.tokenizer import Tokenizer
from tandem.v1 import serving_pb2

FINISH_REASONS = {serving_pb2.FINISH_REASON_STOP: "stop", serving_pb2.FINISH_REASON_LENGTH: "length",
                  serving_pb2.FINISH_REASON_ABORT: "abort"}


class TokenTexts:
    """Each token id's text on its own, cached (logprobs name every token they list)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) or self.tokenizer.id_to_token(token_id) or ""
            if len(self._cache) < 1 << 16:
                self._cache[token_id] = text
        return text


def _logprob(value: float) -> float | None:
    if math.isnan(value):
        return None
    return max(value, -9999.0)


class Answer:
    """One request's answer in OpenAI's shapes. Call `add` for every message, in order."""

    def __init__(self, parsed: ParsedRequest, request_id: str, model_id: str, prompt_tokens: int,
                 token_texts: TokenTexts, prompt_token_ids: list[int], index: int = 0, resumed_after: int = 0):
        """resumed_after: the tokens the client had when it resumed the request (resume_token_ids);
        the answer holds what follows them, its usage counts them too."""
        self.parsed, self.model_id, self.prompt_tokens = parsed, model_id, prompt_tokens
        self.resumed_after = resumed_after
        self.index = index                 # the choice it renders (n > 1: one Answer per choice)
        self.prompt_token_ids = prompt_token_ids
        self.id = ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self._texts = token_texts
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self._logprobs: list = []          # chat entries, or completion (token, logprob, top) triples
        self._offset = len(parsed.echo_text or "")
        self._sent_role = False
        self._sent_ids = False             # return_token_ids: the prompt's ids go with the first choice sent
        # chat with tools: a reply that is (or may still become) a tool call is held back from the
        # stream until it is known; _held is the folded delta not sent yet
        self._tools = parsed.tools if parsed.kind == "chat" else None
        self._holding = self._tools is not None
        self._held: dict | None = None
        self._tool_result: tuple[str | None, list[dict]] | None = None

    # ---- folding ------------------------------------------------------------------------------
    def add(self, m: serving_pb2.GenerateResponse) -> dict:
        """Fold one message; returns its part as a `choice` delta: text, token_ids, logprobs."""
        expected = self.resumed_after + len(self.token_ids)
        if m.index != expected:
            raise RouteError(grpc.StatusCode.INTERNAL, f"token index {m.index} arrived, {expected} expected")
        self.token_ids += m.token_ids
        self.text += m.text
        if m.finished:
            self.finish_reason = FINISH_REASONS.get(m.finish_reason, "stop")
            self.cached_tokens = m.usage.cached_prompt_tokens
        logprobs = self._logprob_entries(m) if self.parsed.logprobs is not None else None
        if logprobs is not None:
            self._logprobs += logprobs
        return {"text": m.text, "token_ids": list(m.token_ids), "logprobs": logprobs}

    def _logprob_entries(self, m: serving_pb2.GenerateResponse) -> list:
        entries = []
        for i, token_id in enumerate(m.token_ids):
            lp = _logprob(m.logprobs[i]) if i < len(m.logprobs) else None
            top = m.top_logprobs[i] if i < len(m.top_logprobs) else None
            alternatives = list(zip(top.token_ids, top.logprobs)) if top is not None else []
            entries.append((token_id, lp, alternatives))
        return entries

    # ---- rendering ----------------------------------------------------------------------------
    def usage(self) -> dict:
        n = self.resumed_after + len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _render_logprobs(self, entries: list | None):
        if entries is None:
            return None
        if self.parsed.kind == "chat":
            return {"content": [self._chat_entry(t, lp, alts) for t, lp, alts in entries]}
        tokens, offsets, tops = [], [], []
        for token_id, lp, alts in entries:
            text = self._texts(token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            tops.append({self._texts(a): _logprob(v) for a, v in alts} if alts else {text: lp})
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def _chat_entry(self, token_id: int, lp, alts) -> dict:
        text = self._texts(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode()),
                "top_logprobs": [{"token": self._texts(a), "logprob": _logprob(v), "bytes": list(self._texts(a).encode())}
                                 for a, v in alts]}

    def _ids(self, choice: dict, token_ids: list[int], first: bool) -> dict:
        if self.parsed.return_token_ids:
            choice["token_ids"] = token_ids
            if first:
                choice["prompt_token_ids"] = self.prompt_token_ids
        return choice

    def tool_calls(self) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of the finished reply (tools.extract, once: call ids stay the same)."""
        if self._tool_result is None:
            self._tool_result = extract(self._tools, self.text) if self._tools is not None else (self.text, [])
        return self._tool_result

    def _finish_with_calls(self) -> str | None:
        """OpenAI's finish_reason when the reply is tool calls: "tool_calls", except for a forced
        (named) function, which ends with "stop"; a reply cut short keeps "length"."""
        if self.finish_reason == "stop" and self._tools is not None and self._tools.mode != "named":
            return "tool_calls"
        return self.finish_reason

    def response(self) -> dict:
        """The whole (non-streaming) response object."""
        logprobs = self._render_logprobs(self._logprobs if self.parsed.logprobs is not None else None)
        if self.parsed.kind == "chat":
            content, calls = self.tool_calls()
            message = {"role": "assistant", "content": self.text}
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
            choice = {"index": self.index, "message": message, "logprobs": logprobs,
                      "finish_reason": self._finish_with_calls() if calls else self.finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": self.index, "text": (self.parsed.echo_text or "") + self.text, "logprobs": logprobs,
                      "finish_reason": self.finish_reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "choices": [self._ids(choice, self.token_ids, True)], "usage": self.usage(), "system_fingerprint": None}

    def chunks(self, delta: dict, finished: bool) -> list[dict]:
        """Stream chunks for one folded message (`delta` from add)."""
        first = not self._sent_role
        first_ids = not self._sent_ids
        out = []
        if self.parsed.kind == "chat":
            if first:
                out.append(self._chunk({"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}))
                self._sent_role = True
            if self._holding:
                self._held = _merged(self._held, delta)
                if not finished and (self._tools.constrained or maybe_call(self.text)):
                    return out
                self._holding = False
                delta, self._held = self._held, None
                calls = self.tool_calls()[1] if finished else []
                if calls:
                    out.append(self._chunk(self._ids({
                        "index": self.index, "delta": {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]},
                        "logprobs": self._render_logprobs(delta["logprobs"]), "finish_reason": self._finish_with_calls()},
                        delta["token_ids"], first_ids)))
                    self._sent_ids = True
                    return out
            choice = {"index": self.index, "delta": {"content": delta["text"]} if delta["text"] or not finished else {},
                      "logprobs": self._render_logprobs(delta["logprobs"]),
                      "finish_reason": self.finish_reason if finished else None}
        else:
            text = (self.parsed.echo_text or "") + delta["text"] if first else delta["text"]
            choice = {"index": self.index, "text": text, "logprobs": self._render_logprobs(delta["logprobs"]),
                      "finish_reason": self.finish_reason if finished else None}
        self._sent_role = self._sent_ids = True
        out.append(self._chunk(self._ids(choice, delta["token_ids"], first_ids)))
        return out

    def usage_chunk(self) -> dict:
        """The last chunk when usage was asked for: no choices, the request's usage."""
        chunk = self._chunk(None)
        chunk["usage"] = self.usage()
        return chunk

    def _chunk(self, choice: dict | None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.parsed.kind == "chat" else "text_completion",
                 "created": self.created, "model": self.model_id, "choices": [choice] if choice else []}
        if self.parsed.include_usage:
            chunk["usage"] = self.usage() if self.parsed.continuous_usage and choice else None
        return chunk


def _merged(held: dict | None, delta: dict) -> dict:
    """Two consecutive folded deltas as one."""
    if held is None:
        return delta
    logprobs = None if held["logprobs"] is None else held["logprobs"] + (delta["logprobs"] or [])
    return {"text": held["text"] + delta["text"], "token_ids": held["token_ids"] + delta["token_ids"],
            "logprobs": logprobs}


def combined_response(answers: list[Answer]) -> dict:
    """The whole response of n choices (answers in choice order): one object, n choices, the
    prompt counted once in usage."""
    response = answers[0].response()
    response["choices"] = [a.response()["choices"][0] for a in answers]
    response["usage"] = combined_usage(answers)
    return response


def combined_usage(answers: list[Answer]) -> dict:
    usage = answers[0].usage()
    completion = sum(len(a.token_ids) for a in answers)
    usage.update(completion_tokens=completion, total_tokens=usage["prompt_tokens"] + completion)
    return usage
