"""Targets: where a load generator sends requests, each as a stream of token counts.

    target = open_target("grpc://127.0.0.1:50051")      # or http://host:port, sim:CONFIG
    async with target:
        async for n in target.stream(prompt_ids, max_tokens=64):   # n tokens just arrived
            ...

Contract of `Target.stream`: yields, for each message that carries output tokens, how many it
carried (> 0), as soon as it arrives; the caller timestamps them. It ends when the request has
finished and raises `TargetError` (with a one-line message) when the request fails at any point,
mid-stream included. `vocab_size()` is the model's vocabulary when the target can tell, else None.

`sim:CONFIG` targets come from simulators registered with `register_simulator`; none is built in.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Protocol


class TargetError(Exception):
    """A request failed; the message says how, in one line."""


class Target(Protocol):
    url: str

    async def __aenter__(self) -> Target: ...

    async def __aexit__(self, *exc) -> None: ...

    def stream(self, prompt: list[int], max_tokens: int) -> AsyncIterator[int]: ...

    async def vocab_size(self) -> int | None: ...

    def describe(self) -> dict: ...


# ------------------------------------------------------------------------------------- simulators

_SIMULATORS: dict[str, Callable[[str], Target]] = {}


def register_simulator(factory: Callable[[str], Target], name: str = "default") -> None:
    """Make `sim:CONFIG` (or `sim:NAME:CONFIG` for a non-default name) build `factory(CONFIG)`."""
    _SIMULATORS[name] = factory


def unregister_simulator(name: str = "default") -> None:
    """Forget a simulator; a no-op when none is registered under `name`."""
    _SIMULATORS.pop(name, None)


def _open_sim(rest: str) -> Target:
    name, sep, config = rest.partition(":")
    if not (sep and name in _SIMULATORS):
        name, config = "default", rest
    if name not in _SIMULATORS:
        raise ValueError("no simulator is registered for sim: targets; a simulator must call "
                         "loadgen.targets.register_simulator(factory) first "
                         f"(registered: {', '.join(sorted(_SIMULATORS)) or 'none'})")
    return _SIMULATORS[name](config)


def open_target(url: str, *, timeout_s: float = 600.0, model: str | None = None,
                tokenizer: str | None = None) -> Target:
    """The target for `url`: grpc://HOST:PORT, http(s)://HOST:PORT or sim:CONFIG; ValueError otherwise."""
    if url.startswith("grpc://"):
        return GrpcTarget(url, timeout_s)
    if url.startswith(("http://", "https://")):
        return OpenAITarget(url, timeout_s, model, tokenizer)
    if url.startswith("sim:"):
        return _open_sim(url.removeprefix("sim:"))
    raise ValueError(f"unknown target {url!r}: use grpc://HOST:PORT, http://HOST:PORT or sim:CONFIG")


# ------------------------------------------------------------------------------------------ gRPC

class GrpcTarget:
    """A Tandem router through the SDK's AsyncClient; ignore_eos so every request runs to max_tokens."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.address = url.removeprefix("grpc://")
        self.timeout_s = timeout_s
        self._client = None

    async def __aenter__(self) -> GrpcTarget:
        from tandem import AsyncClient
        self._client = AsyncClient(self.address)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.close()

    async def vocab_size(self) -> int | None:
        from tandem.errors import TandemError
        try:
            models = await self._client.list_models()
        except TandemError:
            return None
        return models[0]["vocab_size"] if models else None

    async def stream(self, prompt: list[int], max_tokens: int, info: dict | None = None) -> AsyncIterator[int]:
        """`info`, when given, receives the router's TTFT breakdown (queue_s, prefill_s, transfer_s,
        first_decode_s, kv_bytes, …) and the prefill/decode instance ids of a disaggregated request."""
        from tandem.errors import TandemError
        try:
            async for chunk in self._client.generate(token_ids=prompt, max_tokens=max_tokens, ignore_eos=True,
                                                     timeout=self.timeout_s):
                if info is not None:
                    _note(info, chunk)
                if chunk.token_ids:
                    yield len(chunk.token_ids)
                if chunk.finished and chunk.finish_reason == "abort":
                    raise TargetError("request aborted by the server")
        except TandemError as e:
            raise TargetError(str(e).splitlines()[0]) from e

    def describe(self) -> dict:
        return {"kind": "grpc", "url": self.url}


def _note(info: dict, chunk) -> None:
    if chunk.prefill_instance:
        info["prefill_instance"] = chunk.prefill_instance
    if chunk.decode_instance:
        info["decode_instance"] = chunk.decode_instance
    for k, v in (chunk.ttft_breakdown or {}).items():
        if v or k not in info:          # proto3 zeros are "not reported": keep an earlier value
            info[k] = v
    usage = getattr(chunk, "usage", None)
    if usage:                           # final chunk: prompt tokens the prefix cache served
        info["cached_prompt_tokens"] = usage.get("cached_prompt_tokens", 0)


# ------------------------------------------------------------------------------- OpenAI over HTTP

# Fields beyond the OpenAI API that make a server generate exactly max_tokens (vLLM accepts them).
_EXTRAS = ("ignore_eos", "min_tokens")


class OpenAITarget:
    """An OpenAI-compatible server's streaming `/v1/completions`, token ids as the prompt.

    Sends `ignore_eos` and `min_tokens` so every request runs to max_tokens; when the server
    rejects them (HTTP 400 naming one), it drops them for the rest of the run. When it rejects a
    token-id prompt (HTTP 400 naming `prompt`), it sends text from then on: the ids decoded by
    `tokenizer` (a `tokenizer.json` or a directory holding one) when given, else one word per
    token id (same ids → same words, so shared prefixes stay shared; the server's token count
    then only approximates the spec's). Both fallbacks show in `describe()`.
    Counts tokens per SSE event: `token_ids` when the event has them, else the growth of
    `usage.completion_tokens`, else one per event with text.
    """

    def __init__(self, url: str, timeout_s: float, model: str | None = None, tokenizer: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.model = model
        self.extras = True
        self.token_prompt = True
        self.tokenizer_path = tokenizer
        self._tokenizer = None
        self._session = None
        self._asked_models = False

    async def __aenter__(self) -> OpenAITarget:
        import aiohttp
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                              connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def _models(self) -> list[dict]:
        import aiohttp
        try:
            async with self._session.get(self.url + "/v1/models") as r:
                if r.status != 200:
                    return []
                return (await r.json()).get("data") or []
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return []

    async def vocab_size(self) -> int | None:
        models = await self._models()
        self._asked_models = True
        if self.model is None and models:
            self.model = models[0].get("id")
        for m in models:
            if m.get("id") == self.model and m.get("vocab_size"):
                return int(m["vocab_size"])
        return None

    def _text(self, prompt: list[int]) -> str:
        if self.tokenizer_path is None:
            return " ".join(_WORDS[t % len(_WORDS)] for t in prompt)
        if self._tokenizer is None:
            import os

            from tokenizers import Tokenizer
            path = self.tokenizer_path
            self._tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)
        return self._tokenizer.decode(prompt)

    def _body(self, prompt: list[int], max_tokens: int) -> dict:
        body = {"prompt": prompt if self.token_prompt else self._text(prompt), "max_tokens": max_tokens,
                "stream": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        if self.extras:
            body.update(ignore_eos=True, min_tokens=max_tokens)
            body["stream_options"]["continuous_usage_stats"] = True
        return body

    def _fall_back(self, status: int, text: str) -> bool:
        """Drop what a 400 names (extras, then token-id prompts); False when nothing is left to drop."""
        if status != 400:
            return False
        if self.extras and _names_extra(text):
            self.extras = False
            return True
        if self.token_prompt and "prompt" in text.lower():
            self.token_prompt = False
            return True
        return False

    async def stream(self, prompt: list[int], max_tokens: int, info: dict | None = None) -> AsyncIterator[int]:
        """`info` is accepted for the runner's sake; an OpenAI server reports nothing per request."""
        import aiohttp
        if self.model is None and not self._asked_models:
            await self.vocab_size()          # discovers the model id
        try:
            for _ in range(3):
                sent = (self.extras, self.token_prompt)
                async with self._session.post(self.url + "/v1/completions", json=self._body(prompt, max_tokens)) as r:
                    if r.status != 200:
                        text = (await r.text())[:300].replace("\n", " ")
                        # a concurrent request may already have dropped what this 400 names
                        if sent != (self.extras, self.token_prompt) or self._fall_back(r.status, text):
                            continue
                        raise TargetError(f"HTTP {r.status}: {text}")
                    async for n in _sse_token_counts(r.content):
                        yield n
                    return
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TargetError(f"{type(e).__name__}: {e}".splitlines()[0]) from e

    def describe(self) -> dict:
        prompt = "token_ids" if self.token_prompt else ("text (tokenizer)" if self.tokenizer_path
                                                         else "text (one word per token id, approximate)")
        return {"kind": "openai", "url": self.url, "model": self.model, "ignore_eos_extras": self.extras,
                "prompt": prompt}


_WORDS = ("time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school",
          "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week",
          "company", "system", "program", "question", "work", "government", "number", "night", "point")


def _names_extra(text: str) -> bool:
    return any(k in text for k in _EXTRAS + ("continuous_usage_stats", "extra"))


async def _sse_token_counts(content) -> AsyncIterator[int]:
    """Token counts of one SSE completion stream (an aiohttp StreamReader); TargetError on an error event."""
    usage_seen = 0
    done = False
    async for raw in content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            raise TargetError(f"bad SSE event: {data[:120]}") from None
        if "error" in event:
            err = event["error"]
            raise TargetError(f"server error mid-stream: {err.get('message', err) if isinstance(err, dict) else err}")
        choices = event.get("choices") or []
        usage = event.get("usage") or {}
        total = usage.get("completion_tokens")
        if choices:
            choice = choices[0]
            if choice.get("token_ids") is not None:
                n = len(choice["token_ids"])
            elif total is not None:
                n = total - usage_seen
            else:
                n = 1 if choice.get("text") else 0
            if n > 0:
                usage_seen += n
                yield n
            if choice.get("finish_reason") == "abort":
                raise TargetError("request aborted by the server")
        elif total is not None and total > usage_seen:     # the final usage-only event
            yield total - usage_seen
            usage_seen = total
    if not done:
        raise TargetError("stream ended without [DONE]")
