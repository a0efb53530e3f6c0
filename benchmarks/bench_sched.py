"""`make bench-sched [TRACE=FILE]`: queue policies and SLO admission on one cluster, one trace, one run.

    python benchmarks/bench_sched.py [--trace FILE] [--model tiny] [--requests 300] [--out-dir bench-sched]

The cluster: one colocated instance pinned to core 1 (router and this client on core 0) with
--max-num-seqs slots, so that requests queue at the engine, as they do on any saturated instance.
The two systems of a comparison run as two live clusters (their flags differ) and take turns: the
same requests and arrival times, in --rounds rounds of fresh prompts, the order alternating round by
round (A B, B A), so that whatever else the host runs meanwhile falls on both alike.

Workload (default): several applications, each a shared system prompt with its own output length
(a learnable signal: the router's predictor must find it from the prompts alone; no client
hints). This file generates it itself (BUILTIN_APPS: four applications, short answers common, long
ones rare); with --trace FILE any trace loadgen reads is used instead (lengths from the trace).
A request's output length is emulated as a model's answer ending there: it is sent with
max_tokens = the workload's largest output and ignore_eos, and the client stops reading (closing
the stream) after its length, as a chat UI does when the answer ends. So max_tokens says nothing
about the length; the predictor learns what each request cost from what was streamed.

1. Capacity: a burst of --burst requests at t=0 under fcfs; capacity = requests / makespan.
   The TTFT SLO is --slo-scale x the mean e2e latency of requests sent one at a time.
2. FCFS vs SJF at --load x capacity (Poisson arrivals): mean, P50, P90, P99 of e2e latency and
   TTFT, goodput (requests/s meeting the TTFT SLO over the arrival windows). SJF's predictor
   starts cold and learns during the run. The router's queue bound (--max-queue-wait-s) is off
   here and in the capacity burst, so both policies serve every request.
3. Admission none vs slo at --overload x capacity (fcfs both): goodput at the same SLO (a refused
   request counts as not good).
4. Prefix vs load routing: `prefix_vs_load(trace, seed=..., out_dir=...)` from
   benchmarks/bench_sched_prefix.py when that file exists (its own cluster shape, model and
   shared-prefix multi-turn workload unless --trace is given); else null.

In --out-dir: summary.json, <run>.csv per run. On stdout: a host line, a table, the JSON summary,
and last one JSON line {"sjf_vs_fcfs_mean_e2e", "sjf_vs_fcfs_p99_e2e", "prefix_vs_load_p90_ttft",
"slo_vs_none_goodput"}: each the new policy's figure divided by the baseline's from this run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_info import host_line  # noqa: E402
from loadgen import arrivals  # noqa: E402
from loadgen.metrics import RequestResult, summarize  # noqa: E402
from loadgen.runner import run, run_sequential  # noqa: E402
from loadgen.targets import TargetError  # noqa: E402
from services.engine.preemption import PREEMPTION_MODES  # noqa: E402
from services.engine.settings import ENGINE_DEFAULTS  # noqa: E402

# (share of requests, system prompt tokens, user tokens low..high, mean output tokens): 10% noise
BUILTIN_APPS = ((0.45, 48, (8, 40), 8), (0.30, 64, (8, 40), 32), (0.17, 80, (8, 40), 96), (0.08, 96, (8, 40), 256))


@dataclasses.dataclass(frozen=True)
class Spec:
    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    app: int = -1


class Workload:
    """Request specs and their prompts (the runner's duck type of loadgen.workloads.Workload)."""

    def __init__(self, specs: list[Spec], prompts: list[list[int]]):
        self.requests, self._prompts = specs, prompts

    def prompt(self, spec: Spec) -> list[int]:
        return self._prompts[spec.index]

    def at_rate(self, rate: float, seed: int) -> "Workload":
        """The same requests with Poisson arrivals at `rate`/s (seeded)."""
        offsets = arrivals.poisson(len(self.requests), rate, np.random.default_rng([seed, 7]))
        return Workload([dataclasses.replace(s, arrival_s=float(t)) for s, t in zip(self.requests, offsets)],
                        self._prompts)

    def burst(self, n: int) -> "Workload":
        return Workload([dataclasses.replace(s, arrival_s=0.0) for s in self.requests[:n]], self._prompts)

    def head(self, n: int) -> "Workload":
        return Workload(self.requests[:n], self._prompts)

    def salted(self, salt: int, vocab: int) -> "Workload":
        """Fresh user tokens (same lengths and system prompts), so runs on one cluster do not reuse each
        other's cached prompts. A trace's prompts stay as they are (every policy runs on a fresh cluster)."""
        if any(s.app < 0 for s in self.requests):
            return self
        rng = np.random.default_rng([salt, 11])
        prompts = []
        for s, p in zip(self.requests, self._prompts):
            sys_len = BUILTIN_APPS[s.app][1] if s.app >= 0 else 0
            prompts.append(p[:sys_len] + [int(t) for t in rng.integers(3, vocab, len(p) - sys_len)])
        return Workload(self.requests, prompts)


def builtin_workload(n: int, vocab: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 5])
    systems = [[int(t) for t in np.random.default_rng([seed, 100 + a]).integers(3, vocab, app[1])]
               for a, app in enumerate(BUILTIN_APPS)]
    shares = np.array([a[0] for a in BUILTIN_APPS])
    specs, prompts = [], []
    for i in range(n):
        a = int(rng.choice(len(BUILTIN_APPS), p=shares / shares.sum()))
        _, _, (lo, hi), mean_out = BUILTIN_APPS[a]
        user = [int(t) for t in rng.integers(3, vocab, int(rng.integers(lo, hi + 1)))]
        out = max(1, int(round(rng.normal(mean_out, 0.1 * mean_out))))
        prompts.append(systems[a] + user)
        specs.append(Spec(i, 0.0, len(prompts[-1]), out, a))
    return Workload(specs, prompts)


def trace_workload(trace: str, n: int, vocab: int, seed: int, max_input: int, max_output: int) -> Workload:
    from loadgen.workloads import WorkloadConfig, build_workload
    wl = build_workload(WorkloadConfig(trace=trace, max_requests=n, max_input_tokens=max_input,
                                       max_output_tokens=max_output, vocab_size=vocab, seed=seed))
    specs = [Spec(i, 0.0, s.input_tokens, s.output_tokens) for i, s in enumerate(wl.requests)]
    return Workload(specs, [wl.prompt(s) for s in wl.requests])


class CutTarget:
    """A Tandem router over gRPC; each request is sent with max_tokens=`cap` and ignore_eos, and the
    stream is closed once the spec's output length has arrived (the answer "ends" there)."""

    def __init__(self, address: str, cap: int, timeout_s: float = 600.0):
        self.address, self.cap, self.timeout_s = address, cap, timeout_s

    async def __aenter__(self):
        from tandem import AsyncClient
        self._client = AsyncClient(self.address, max_retries=0)
        return self

    async def __aexit__(self, *exc):
        await self._client.close()

    async def stream(self, prompt: list[int], max_tokens: int):
        from tandem.errors import TandemError
        got = 0
        stream = self._client.generate(token_ids=prompt, max_tokens=self.cap, ignore_eos=True, timeout=self.timeout_s)
        try:
            async for chunk in stream:
                n = min(len(chunk.token_ids), max_tokens - got)
                if n:
                    got += n
                    yield n
                if got >= max_tokens or chunk.finished:
                    return
        except TandemError as e:
            raise TargetError(str(e).splitlines()[0]) from e
        finally:
            await stream.aclose()

    def describe(self) -> dict:
        return {"kind": "grpc-cut", "address": self.address, "cap": self.cap}


@contextlib.contextmanager
def cluster(model: str, out_dir: str, name: str, queue_policy: str, admission: str, slo_ttft_s: float,
            max_num_seqs: int, preemption_mode: str = ENGINE_DEFAULTS.preemption_mode,
            displace_ratio: float = ENGINE_DEFAULTS.displace_ratio, queue_bound: bool = True,
            aging_s: float = ENGINE_DEFAULTS.queue_aging_s):
    """One live cluster. queue_bound False: the router's --max-queue-wait-s bound is off, so every
    request is served and a queue-order comparison is over the same requests (the bound refuses a
    burst's tail under fcfs, whose latencies would then be missing from fcfs's figures)."""
    from tandem.local_cluster import LocalCluster
    pin = ["--cpu-cores", "1"] if len(os.sched_getaffinity(0)) > 1 else []
    worker = ["--dtype", "float32", "--max-num-seqs", str(max_num_seqs), "--queue-policy", queue_policy,
              "--preemption-mode", preemption_mode, "--displace-ratio", str(displace_ratio),
              "--queue-aging-s", str(aging_s), *pin]
    router = ["--queue-policy", queue_policy, "--admission", admission, "--slo-ttft-s", f"{slo_ttft_s:.6g}",
              "--pools", "fixed", "--queue-aging-s", str(aging_s),
              *([] if queue_bound else ["--max-queue-wait-s", "0"])]
    with LocalCluster(model, prefill=0, decode=0, colocated=1, worker_args=worker, router_args=router,
                      log_dir=os.path.join(out_dir, f"{name}-logs")) as c:
        yield c.address


def run_load(address: str, wl: Workload, cap: int) -> tuple[list[RequestResult], float]:
    async def main():
        async with CutTarget(address, cap) as target:
            return await run(wl, target, progress=False)
    return asyncio.run(main())


def run_sequential_load(address: str, wl: Workload, cap: int) -> list[RequestResult]:
    async def main():
        async with CutTarget(address, cap) as target:
            return await run_sequential(wl, target)
    return asyncio.run(main())


def compare(a, base: Workload, vocab: int, cap: int, slo: float, rate: float, n: int, systems: dict,
            salt: int, queue_bound: bool = True) -> dict:
    """{name: figures} of each system (name → (queue policy, admission[, sjf displace ratio])) on `n` requests at `rate`,
    sent in a.rounds rounds, the systems' order alternating round by round."""
    per_round = max(1, n // a.rounds)
    results: dict = {name: [] for name in systems}
    specs: dict = {name: [] for name in systems}
    window = 0.0
    with contextlib.ExitStack() as stack:
        addrs = {name: stack.enter_context(cluster(a.model, a.out_dir, name, qp, adm, slo, a.max_num_seqs,
                                                   a.preemption_mode, *(rest or (a.displace_ratio,)),
                                                   queue_bound=queue_bound, aging_s=a.queue_aging_s))
                 for name, (qp, adm, *rest) in systems.items()}
        for name, addr in addrs.items():
            run_sequential_load(addr, base.salted(1, vocab).head(4), cap)          # warm-up, the same for all
        for k in range(a.rounds):
            wl = base.salted(salt + k, vocab).head(per_round).at_rate(rate, a.seed + salt + k)
            window += wl.requests[-1].arrival_s
            order = list(systems) if k % 2 == 0 else list(reversed(systems))
            for name in order:
                got, _ = run_load(addrs[name], wl, cap)
                results[name] += got
                specs[name] += wl.requests
                print(f"  round {k} {name}: {_line(figures(got, slo, wl.requests[-1].arrival_s))}", flush=True)
    out = {}
    for name in systems:
        write_csv(os.path.join(a.out_dir, f"{name}.csv"), results[name], Workload(specs[name], []))
        out[name] = figures(results[name], slo, window)
        out[name]["refused"] = sum(1 for r in results[name] if r.error and "RESOURCE_EXHAUSTED" in r.error)
        print(f"{name}: {_line(out[name])}, refused {out[name]['refused']}", flush=True)
    return out


def figures(results: list[RequestResult], slo_ttft_s: float, window_s: float) -> dict:
    s = summarize(results, ttft_slo=slo_ttft_s)
    met = sum(r.meets(slo_ttft_s, None) for r in results)
    return {"e2e": s["e2e"], "ttft": s["ttft"], "completed": s["completed"], "failed": s["failed"],
            "attainment_ttft": s["attainment_ttft"], "goodput_rps": met / window_s if window_s > 0 else 0.0,
            "errors": s["errors"]}


def write_csv(path: str, results: list[RequestResult], wl: Workload) -> None:
    with open(path, "w", newline="") as f:
        w = None
        for r, spec in zip(results, wl.requests):
            row = {"app": spec.app, **r.row()}
            if w is None:
                w = csv.DictWriter(f, fieldnames=list(row))
                w.writeheader()
            w.writerow(row)


def ratio(new, base):
    return None if new is None or not base else round(new / base, 4)


def prefix_part(a) -> tuple[float | None, dict | None]:
    """(prefix routing's P90 TTFT / load-only's, its figures) from benchmarks/bench_sched_prefix.py,
    on its own default cluster and workload (a shared-prefix multi-turn one) unless --trace is given;
    (None, None) when that file is absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_sched_prefix.py")
    if not os.path.exists(path):
        return None, None
    from benchmarks.bench_sched_prefix import prefix_vs_load
    got = prefix_vs_load(a.trace, seed=a.seed, out_dir=os.path.join(a.out_dir, "prefix-vs-load"))
    return got.get("prefix_vs_load_p90_ttft"), got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_sched.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--trace", default=None, help="any trace loadgen reads (default: the built-in applications)")
    p.add_argument("--requests", type=int, default=240, help="requests per queue policy (all rounds)")
    p.add_argument("--admission-requests", type=int, default=160, help="requests per admission mode (all rounds)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per comparison")
    p.add_argument("--burst", type=int, default=80, help="requests of the capacity burst")
    p.add_argument("--max-num-seqs", type=int, default=4, help="the instance's batch slots")
    p.add_argument("--load", type=float, default=0.85, help="FCFS/SJF arrival rate as a share of capacity")
    p.add_argument("--overload", type=float, default=1.5, help="admission arrival rate as a share of capacity")
    p.add_argument("--slo-scale", type=float, default=2.0, help="TTFT SLO = this x the unloaded mean e2e")
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-output-tokens", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-prefix", action="store_true", help="leave prefix_vs_load out (null)")
    p.add_argument("--displace-ratio", type=float, default=ENGINE_DEFAULTS.displace_ratio,
                   help="the sjf cluster's --displace-ratio (0: never)")
    p.add_argument("--queue-aging-s", type=float, default=ENGINE_DEFAULTS.queue_aging_s,
                   help="sjf's aging bound on every cluster (router and workers)")
    p.add_argument("--also-no-displacement", action="store_true",
                   help="a third cluster in the queue-policy comparison: sjf with --displace-ratio 0")
    p.add_argument("--skip-admission", action="store_true", help="leave admission none vs slo out (null)")
    p.add_argument("--preemption-mode", default="auto", choices=PREEMPTION_MODES,
                   help="every cluster's workers (sjf's displaced requests keep their KV compressed when "
                        "that is measured cheaper)")
    p.add_argument("--out-dir", default="bench-sched")
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    print(json.dumps({"host": host_line()}), flush=True)
    from services.engine.loader import resolve_model
    vocab = resolve_model(a.model, weights=False).config.vocab_size
    n = max(a.requests, a.admission_requests, a.burst)
    if a.trace:
        base = trace_workload(a.trace, n, vocab, a.seed, a.max_input_tokens, a.max_output_tokens)
        workload_note = f"trace {a.trace}"
    else:
        base = builtin_workload(n, vocab, a.seed)
        workload_note = ("built-in applications (this file's BUILTIN_APPS: share, system prompt, user tokens, "
                         "mean output): " + json.dumps(BUILTIN_APPS))
    cap = max(s.output_tokens for s in base.requests)
    summary: dict = {"host_load_1m_before": os.getloadavg()[0], "model": a.model, "workload": workload_note, "max_num_seqs": a.max_num_seqs, "cap": cap}
    started = time.monotonic()

    # 1. capacity and the SLO, on a fcfs cluster
    with cluster(a.model, a.out_dir, "calibrate", "fcfs", "none", 2.0, a.max_num_seqs, queue_bound=False) as addr:
        run_sequential_load(addr, base.salted(1, vocab).head(8), cap)            # warm-up
        unloaded = run_sequential_load(addr, base.salted(2, vocab).head(16), cap)
        mean_e2e0 = float(np.mean([r.e2e_s for r in unloaded if r.ok]))
        burst, wall = run_load(addr, base.salted(3, vocab).burst(a.burst), cap)
        makespan = max(r.end_s for r in burst if r.end_s is not None)
    capacity = sum(r.ok for r in burst) / makespan
    slo = a.slo_scale * mean_e2e0
    summary.update({"unloaded_mean_e2e_s": mean_e2e0, "capacity_rps": capacity, "slo_ttft_s": slo})
    print(f"capacity {capacity:.2f} req/s, unloaded mean e2e {mean_e2e0:.3f} s, TTFT SLO {slo:.3f} s", flush=True)

    # 2. fcfs vs sjf near saturation, 3. admission none vs slo at overload: each pair on two live
    # clusters, their runs interleaved in rounds (A B, then B A) so that whatever else the host does
    # falls on both alike; each round sends fresh prompts (the same ones to both).
    rate = a.load * capacity
    policies = {"fcfs": ("fcfs", "none"), "sjf": ("sjf", "none")}
    if a.also_no_displacement:
        policies["sjf_no_displacement"] = ("sjf", "none", 0.0)
    runs = compare(a, base, vocab, cap, slo, rate, a.requests, policies, salt=4, queue_bound=False)
    summary["queue_policy"] = {"rate_rps": rate, **runs}
    rate = a.overload * capacity
    adm = None if a.skip_admission else compare(a, base, vocab, cap, slo, rate, a.admission_requests,
                                                {"none": ("fcfs", "none"), "slo": ("fcfs", "slo")}, salt=40)
    summary["admission"] = adm and {"rate_rps": rate, **adm}

    # 4. prefix vs load routing (the other part of issue 16, when present)
    prefix_ratio, prefix_detail = (None, None) if a.skip_prefix else prefix_part(a)
    summary["prefix_vs_load"] = prefix_detail
    summary["wall_s"] = time.monotonic() - started
    summary["host_load_1m_after"] = os.getloadavg()[0]

    fcfs, sjf = runs["fcfs"], runs["sjf"]
    headline = {
        "sjf_vs_fcfs_mean_e2e": ratio(_get(sjf, "e2e", "mean"), _get(fcfs, "e2e", "mean")),
        "sjf_vs_fcfs_p99_e2e": ratio(_get(sjf, "e2e", "p99"), _get(fcfs, "e2e", "p99")),
        "prefix_vs_load_p90_ttft": prefix_ratio,
        "slo_vs_none_goodput": adm and ratio(adm["slo"]["goodput_rps"], adm["none"]["goodput_rps"]),
    }
    summary["headline"] = headline
    with open(os.path.join(a.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary), flush=True)
    print(json.dumps(headline), flush=True)
    return 0


def _get(run: dict, what: str, stat: str):
    return (run.get(what) or {}).get(stat)


def _line(f: dict) -> str:
    e, t = f["e2e"] or {}, f["ttft"] or {}
    fmt = lambda d, k: "-" if d.get(k) is None else f"{d[k]:.3f}"    # noqa: E731
    return (f"e2e mean {fmt(e, 'mean')} p50 {fmt(e, 'p50')} p99 {fmt(e, 'p99')} | ttft mean {fmt(t, 'mean')} "
            f"p50 {fmt(t, 'p50')} p99 {fmt(t, 'p99')} | goodput {f['goodput_rps']:.2f}/s "
            f"attain {f['attainment_ttft'] or 0:.2f} | failed {f['failed']}")


if __name__ == "__main__":
    sys.exit(main())
