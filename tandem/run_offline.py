"""`tandem run`: offline batch generation on one engine, JSON lines in, JSON lines out."""
from __future__ import annotations

import json
import sys
import time
from collections import deque
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


ORDERS = ("prefix", "input")
DEFAULT_ORDER = "prefix"
# Groups whose shared prefix is being computed at once (their leaders queued, first token not out).
MAX_LEADERS_AHEAD = 2


@dataclass(frozen=True)
class PrefixGroup:
    """Prompts (indices into the batch) that share at least one KV block of prefix with `leader`."""
    leader: int
    followers: tuple[int, ...]


def plan_prefix_groups(prompts: list[list[int]], block_size: int) -> list[PrefixGroup]:
    """Prompts sorted by their tokens (prompts sharing a prefix become neighbours), cut into groups
    whose members share at least one full block with the group's first prompt. Every index appears
    exactly once; groups and members come in sorted order."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups and _common_prefix(prompts[groups[-1][0]], prompts[i]) >= block_size:
            groups[-1][1].append(i)
        else:
            groups.append((i, []))
    return [PrefixGroup(leader, tuple(followers)) for leader, followers in groups]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def generate_prefix_ordered(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """engine.generate with the batch reordered so each shared prefix is computed once and reused
    while it is in the cache (BatchLLM's idea): the groups of plan_prefix_groups go in sorted
    order; a group's leader computes the prefix, its followers are queued as soon as the leader's
    prompt is done (its blocks are cached then), ahead of later groups' leaders. The engine's
    waiting queue holds at most max_num_seqs requests (what one step could admit), and at most
    MAX_LEADERS_AHEAD leaders compute their prefix at a time, so a prefix is not evicted by later
    groups' before its followers are admitted. Results are in input order, as engine.generate's."""
    groups = plan_prefix_groups(prompts, engine.kv.block_size)
    next_group = 0
    ready: deque[int] = deque()                 # followers whose leader's prompt is cached
    waiting_for: dict[str, PrefixGroup] = {}    # leader's request id → its group (prompt not done yet)
    ids: dict[int, str] = {}
    final: dict[str, object] = {}
    sched = engine.scheduler
    window = max(2, engine.config.scheduler.max_num_seqs)

    def submit(i: int) -> str:
        ids[i] = engine.add_request(prompts[i], params[i], validated=True)
        return ids[i]

    while next_group < len(groups) or ready or engine.has_unfinished():
        while (ready or next_group < len(groups)) and len(sched.waiting) < window:
            if ready:
                i = ready.popleft()
            elif len(waiting_for) >= MAX_LEADERS_AHEAD:
                break
            else:
                group = groups[next_group]
                next_group += 1
                i = group.leader
                if group.followers:
                    waiting_for[submit(i)] = group
                    continue
            submit(i)
        for o in engine.step():
            group = waiting_for.pop(o.request_id, None) if o.new_token_ids else None
            if group is not None:
                ready.extend(group.followers)
            if o.finished:
                final[o.request_id] = o
    return [final[ids[i]] for i in range(len(prompts))]


def run_offline(engine, prompts: list[PromptLine], base: SamplingParams, out, order: str = DEFAULT_ORDER) -> dict:
    """Generate every prompt; write one JSON line each, in input order. Returns throughput stats.

    order: "prefix" (default) computes prompts grouped by shared prefix (generate_prefix_ordered);
    "input" submits them all at once in input order. The output is the same either way (greedy, or
    seeded sampling); only the time it takes differs."""
    if order not in ORDERS:
        raise InputError(f"order {order!r}: use one of {', '.join(ORDERS)}")
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
    if order == "prefix" and engine.kv.enable_prefix_caching:
        results = generate_prefix_ordered(engine, ids_list, params_list)
    else:
        results = engine.generate(ids_list, params_list)
    elapsed = time.perf_counter() - start
    for r in results:
        out.write(json.dumps({"token_ids": r.token_ids, "text": r.text,
                              "finish_reason": FinishReason(r.finish_reason).name.lower()}) + "\n")
    out.flush()
    n_out = sum(len(r.token_ids) for r in results)
    n_in = sum(len(i) for i in ids_list)
    return {"requests": len(results), "order": order, "prompt_tokens": n_in,
            "cached_prompt_tokens": sum(r.num_cached_tokens for r in results), "output_tokens": n_out,
            "elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(n_out / elapsed, 1),
            "total_tokens_per_s": round((n_in + n_out) / elapsed, 1)}
