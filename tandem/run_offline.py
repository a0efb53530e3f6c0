"""`tandem run`: offline batch generation on one engine, JSON lines in, JSON lines out."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace

from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError, SamplingParams


class InputError(ValueError):
    """A malformed prompts file; the message names the line and the fix."""


@dataclass
class PromptLine:
    prompt: str | None
    token_ids: list[int] | None
    max_tokens: int | None


def read_prompts(path: str) -> list[PromptLine]:
    try:
        f = sys.stdin if path == "-" else open(path)
    except OSError as e:
        raise InputError(f"cannot open {path}: {e.strerror}") from None
    lines = []
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be an object "
                                 'like {"prompt": "..."} or {"token_ids": [1, 2]}') from None
            if not isinstance(obj, dict) or ("prompt" in obj) == ("token_ids" in obj):
                raise InputError(f'{path} line {n}: needs exactly one of "prompt" (a string) or "token_ids" (a list)')
            prompt, ids = obj.get("prompt"), obj.get("token_ids")
            if prompt is not None and not isinstance(prompt, str):
                raise InputError(f'{path} line {n}: "prompt" must be a string')
            if prompt == "" or ids == []:
                raise InputError(f'{path} line {n}: prompt is empty; give at least one character or token id')
            if ids is not None and (not isinstance(ids, list) or not all(isinstance(t, int) for t in ids)):
                raise InputError(f'{path} line {n}: "token_ids" must be a list of integers')
            mt = obj.get("max_tokens")
            if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool)):
                raise InputError(f'{path} line {n}: "max_tokens" must be an integer')
            lines.append(PromptLine(prompt, ids, mt))
    if not lines:
        raise InputError(f"{path} holds no prompts")
    return lines


def run_offline(engine, prompts: list[PromptLine], base: SamplingParams, out) -> dict:
    """Generate every prompt; write one JSON line each, in input order. Returns throughput stats."""
    tok = engine.tokenizer
    ids_list, params_list = [], []
    for n, line in enumerate(prompts, 1):
        ids = line.token_ids if line.token_ids is not None else tok.encode(line.prompt)
        params = base if line.max_tokens is None else replace(base, max_tokens=line.max_tokens)
        try:
            engine.validate(ids, params)
        except InvalidRequestError as e:
            raise InputError(f"prompt {n}: {e}") from None
        ids_list.append(ids)
        params_list.append(params)
    start = time.perf_counter()
    results = engine.generate(ids_list, params_list)
    elapsed = time.perf_counter() - start
    for r in results:
        out.write(json.dumps({"token_ids": r.token_ids, "text": r.text,
                              "finish_reason": FinishReason(r.finish_reason).name.lower()}) + "\n")
    out.flush()
    n_out = sum(len(r.token_ids) for r in results)
    n_in = sum(len(i) for i in ids_list)
    return {"requests": len(results), "prompt_tokens": n_in, "output_tokens": n_out,
            "elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(n_out / elapsed, 1),
            "total_tokens_per_s": round((n_in + n_out) / elapsed, 1)}
