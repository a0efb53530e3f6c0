"""Live migration on `small` (bfloat16), printed as JSON lines.

A 1P+2D cluster (workers pinned: decode-0 alone on one core, decode-1 with the idle prefill
worker on the other). For each sequence length, one request runs until it has generated a few
tokens, then moves to the other decode instance, by two methods in the same run:

- `kv`: live migration (multi-stage pre-copy of KV blocks, then stop-and-copy);
- `recompute`: the request moves without its KV and the destination re-prefills prompt + output
  (what a system without KV migration does).

Per move:
- `downtime_ms`: the client-visible stall: the gap between the last token from the source and the
  first token from the destination, minus one normal step (the median gap of that request's other
  tokens). This is the issue's definition: pause until the next token, beyond one normal step.
- `pause_to_ack_ms`: the source's own measure, pause → destination acknowledged.
- `total_ms`: Migrate call start → commit, as the source measured it.
- `precopy_step_slowdown`: the request's inter-token gaps while its blocks were being pre-copied
  (it keeps decoding on the source), divided by its gaps before the migration started.

Summary lines compare lengths (goal: longest downtime ≤ 1.5× shortest, and below one decode
step) and methods (goal: recompute ≥ 10× kv downtime at 4,096 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tandem.local_cluster import LocalCluster  # noqa: E402
from tandem.v1 import admin_pb2, admin_pb2_grpc, serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

WORKER_ARGS = ["--dtype", "bfloat16", "--kv-memory-gib", "1.0", "--max-num-batched-tokens", "2048"]
MOVE_AT = 8            # migrate once this many tokens arrived
AFTER = 24             # tokens generated after the move point


class TimedStream:
    """A Generate stream read on a thread, with each token's arrival time."""

    def __init__(self, router: str, request_id: str, prompt: list[int], max_tokens: int):
        self.times: list[float] = []
        self.messages = []
        self._cond = threading.Condition()
        self._channel = grpc.insecure_channel(router)
        req = serving_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=serving_pb2.SamplingParams(
            max_tokens=max_tokens, ignore_eos=True))
        self._call = serving_pb2_grpc.ServingStub(self._channel).Generate(req, timeout=600)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for m in self._call:
            now = time.perf_counter()
            with self._cond:
                self.times += [now] * len(m.token_ids)
                self.messages.append(m)
                self._cond.notify_all()

    def wait_tokens(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self.times) >= n, 600)

    def join(self) -> None:
        self._thread.join(600)
        self._channel.close()


def instances(router: str) -> dict[str, worker_pb2.LoadReport]:
    with grpc.insecure_channel(router) as ch:
        reply = admin_pb2_grpc.AdminStub(ch).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
    return {r.instance_id: r for r in reply.instances if r.role == worker_pb2.ROLE_DECODE}


def move(router: str, length: int, recompute: bool, vocab: int, seed: int, max_len: int) -> dict:
    """`length`: the request's whole length (prompt + output), capped below the context."""
    rng = random.Random(seed)
    prompt = [rng.randrange(10, vocab - 1) for _ in range(min(length, max_len - 1) - MOVE_AT - AFTER)]
    rid = f"{'rc' if recompute else 'kv'}-{length}-{seed}"
    s = TimedStream(router, rid, prompt, MOVE_AT + AFTER)
    s.wait_tokens(MOVE_AT)
    decodes = instances(router)
    src = decodes[s.messages[0].decode_instance]
    dst = next(r for i, r in sorted(decodes.items()) if i != src.instance_id)
    t_call = time.perf_counter()
    with grpc.insecure_channel(src.address) as ch:
        r = worker_pb2_grpc.WorkerStub(ch).Migrate(worker_pb2.MigrateRequest(
            request_id=rid, destination_instance_id=dst.instance_id, destination_address=dst.address,
            recompute=recompute, reason="benchmark"), timeout=600)
    s.join()
    if not r.committed:
        return {"length": length, "method": "recompute" if recompute else "kv", "committed": False,
                "abort_reason": r.abort_reason}
    t, n = s.times, r.next_index
    gaps = [t[i] - t[i - 1] for i in range(1, len(t))]
    stall = t[n] - t[n - 1]
    normal = statistics.median(g for i, g in enumerate(gaps, 1) if i != n)
    before = [g for i, g in enumerate(gaps, 1) if t[i] <= t_call]
    t_pause = t_call + r.total_s - r.downtime_s
    during = [g for i, g in enumerate(gaps, 1) if t_call < t[i - 1] and t[i] <= t_pause]
    return {"length": length, "method": "recompute" if recompute else "kv", "committed": True,
            "tokens_at_move": len(prompt) + n,
            "downtime_ms": (stall - normal) * 1e3, "step_ms": normal * 1e3,
            "pause_to_ack_ms": r.downtime_s * 1e3, "total_ms": r.total_s * 1e3, "stages": r.stages,
            "blocks_copied": r.blocks_copied, "precopy_gaps": len(during),
            "precopy_step_slowdown": (statistics.mean(during) / statistics.mean(before)) if during and before else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--lengths", default="256,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from services.engine.builder import load_tokenizer
    from services.engine.loader import export_model, resolve_model
    loaded = resolve_model(a.model)
    vocab, max_len = loaded.config.vocab_size, loaded.config.max_position_embeddings
    model = os.path.join(tempfile.mkdtemp(prefix="tandem-bench-"), a.model)
    export_model(loaded, model, load_tokenizer(loaded))
    lengths = [int(x) for x in a.lengths.split(",")]
    rows = []
    with LocalCluster(model, prefill=1, decode=2, pin_cores=True, worker_args=WORKER_ARGS,
                      router_args=["--no-reschedule"]) as c:
        move(c.address, 256, False, vocab, 999, max_len)            # warm-up both paths
        move(c.address, 256, True, vocab, 998, max_len)
        for length in lengths:
            for rep in range(a.repeats):
                for recompute in (False, True):
                    # distinct prompts everywhere: a recompute must not find the prompt in a prefix cache
                    row = move(c.address, length, recompute, vocab, 2 * rep + recompute, max_len)
                    rows.append(row)
                    print(json.dumps({"bench": "migration", **row}), flush=True)
    summary = {}
    for method in ("kv", "recompute"):
        for length in lengths:
            ok = [r for r in rows if r["method"] == method and r["length"] == length and r["committed"]]
            if ok:
                summary[(method, length)] = {k: statistics.median(r[k] for r in ok)
                                             for k in ("downtime_ms", "step_ms", "pause_to_ack_ms", "total_ms")}
    for (method, length), s in sorted(summary.items()):
        print(json.dumps({"bench": "migration_median", "method": method, "length": length, **s}), flush=True)
    kv = [summary.get(("kv", n)) for n in lengths]
    if all(kv):
        shortest, longest = kv[0]["downtime_ms"], kv[-1]["downtime_ms"]
        slow = [r["precopy_step_slowdown"] for r in rows if r["method"] == "kv" and r.get("precopy_step_slowdown")]
        out = {"bench": "migration_summary",
               "kv_downtime_ms_by_length": {n: round(s["downtime_ms"], 2) for n, s in zip(lengths, kv)},
               "longest_over_shortest": longest / shortest if shortest > 0 else None,
               "goal_flat_le_1_5": shortest > 0 and longest / shortest <= 1.5,
               "kv_downtime_below_one_step": all(s["downtime_ms"] < s["step_ms"] for s in kv),
               "precopy_step_slowdown_mean": statistics.mean(slow) if slow else None,
               "precopy_slowdown_samples": len(slow)}
        rc = summary.get(("recompute", lengths[-1]))
        if rc:
            out["recompute_over_kv_at_longest"] = rc["downtime_ms"] / max(kv[-1]["downtime_ms"], 1e-3)
            out["recompute_downtime_ms_at_longest"] = rc["downtime_ms"]
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
