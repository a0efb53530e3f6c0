"""`make bench-sim`: the simulator against the real cluster on this host, its speed at scale, the
planner against a measured goodput, and Llumnix's migration experiment at 64 decode instances.

1. profile: `tandem profile`'s measurement of the engine here (1 thread, as a pinned worker).
2. validation: Tandem fixed 1P+1D, colocated x2 and adaptive 1P+1D (loadgen.bench_systems, pinned
   cores) driven by loadgen's runner at three rates of the Azure conversation trace; the simulator
   replays the same requests (same arrivals and lengths); relative errors of P50/P90/P99 TTFT and TPOT.
3. scale: 128P+128D simulated over the trace's first 15/30/60 minutes (its own arrivals), and over
   3 sizes of the trace compressed so each P/D pair carries the middle validation rate: wall time,
   peak memory (a forked child's max RSS growth), speed-up over real time.
4. planner: `tandem plan` for 2 instances at this host's SLOs (5x the unloaded prefill of the mean
   prompt, 3x the batch-1 decode step), then the chosen configuration's goodput measured on the real
   cluster (rates stepped by 25% from the prediction until the 90% verdict flips).
5. migration (simulated): 32P+64D at 85% of capacity, Gamma arrivals (CV 2 and 4), KV-limited decode instances:
   round-robin dispatch, load-balanced without migration, Tandem's rescheduler with migration.
Prints one JSON line per figure and, last, {"max_rel_error", "speedup_256", "planner_rel_error",
"migration_p99_ttft_gain", "migration_p99_decode_gain"}.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_info import host_line                                   # noqa: E402
from loadgen.metrics import summarize                                        # noqa: E402
from loadgen.workloads import WorkloadConfig, build_workload                 # noqa: E402
from router.migration.policy import PolicyConfig                             # noqa: E402
from router.cluster.role_policy import RolePolicyConfig                              # noqa: E402
from tandem.sim import planner                                               # noqa: E402
from tandem.sim.costmodel import load_profile, save_profile                  # noqa: E402
from tandem.sim.router import RouterConfig                                   # noqa: E402
from tandem.sim.simulator import SimConfig, simulate                         # noqa: E402

TRACE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces",
                                      "AzureLLMInferenceTrace_conv.csv"))
SYSTEMS = ("fixed", "colocated", "adaptive")
POINTS = [(m, q) for m in ("ttft", "tpot") for q in ("p50", "p90", "p99")]


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def log(msg: str) -> None:
    print(f"bench-sim: {msg}", file=sys.stderr, flush=True)


def sim_config(system: str, slo: tuple[float, float], **kw) -> SimConfig:
    role = RolePolicyConfig(ttft_slo_s=slo[0], tpot_slo_s=slo[1])
    if system == "colocated":
        return SimConfig(prefill=0, decode=0, colocated=2, router=RouterConfig(role_policy=role), **kw)
    return SimConfig(prefill=1, decode=1, router=RouterConfig(pools="fixed" if system == "fixed" else "adaptive",
                                                              role_policy=role), **kw)


# ------------------------------------------------------------------------------------ real cluster

WARMUP = 5           # sequential requests before the measured runs; the last 3 calibrate the path overhead


def measure_real(system: str, args, slo: tuple[float, float], rates, dtype: str) -> list[tuple]:
    """[(warm-up workload, its sequential results, None)] + [(workload, results, wall)] per rate, on one
    started cluster of `system`. `rates`: a list, or a function (None, then each run's (results, wall))
    → the next rate, None to stop."""
    from loadgen.bench_systems import Options, start_system
    from loadgen.runner import run, run_sequential
    from loadgen.targets import open_target
    opts = Options(model=args.model, dtype=dtype, out_dir=args.out_dir, adaptive_slo=slo)

    async def drive(url: str):
        target = open_target(url, timeout_s=300.0)
        out = []
        async with target:
            vocab = await target.vocab_size() or 32000
            warm = build_workload(workload_config(args, rate=1.0, n=WARMUP, vocab=vocab, seed=args.seed + 1_000_003))
            out.append((warm, await run_sequential(warm, target), None))
            decide = rates if callable(rates) else (lambda last, _it=iter(rates): next(_it, None))
            rate, i = decide(None), 0
            while rate is not None:
                i += 1
                wl = build_workload(workload_config(args, rate=rate, n=requests_at(args, rate), vocab=vocab, salt=i))
                results, wall = await run(wl, target, progress=False)
                out.append((wl, results, wall))
                log(f"{system} at {rate:.3g} req/s: {sum(r.ok for r in results)}/{len(results)} done in {wall:.0f} s")
                await asyncio.sleep(2.0)
                rate = decide((results, wall))
        return out

    with start_system(system, opts) as handle:
        return asyncio.run(drive(handle.url))


def workload_config(args, *, rate: float | None, n: int | None, vocab: int = 32000, seed: int | None = None,
                    salt: int = 0, **kw) -> WorkloadConfig:
    return WorkloadConfig(trace=args.trace, max_requests=n, rate=rate, max_input_tokens=args.max_input_tokens,
                          max_output_tokens=args.max_output_tokens, vocab_size=vocab,
                          seed=args.seed if seed is None else seed, prompt_salt=salt, **kw)


def requests_at(args, rate: float) -> int:
    return int(min(args.max_requests, max(args.min_requests, rate * args.run_s)))


def path_overhead(profile, system: str, warm: tuple) -> float:
    """What the simulator leaves out of an unloaded request's TTFT (client and router hops, RPCs, the
    worker's own threads): measured minus simulated TTFT of warm-up requests sent one at a time."""
    import statistics
    wl, results, _ = warm
    diffs = []
    for spec, res in list(zip(wl.requests, results))[-3:]:
        if res.ttft_s is None:
            continue
        alone = dataclasses.replace(spec, index=0, arrival_s=0.0)
        sim, _ = simulate(profile, [alone], sim_config(system, (1.0, 1.0)))
        diffs.append(res.ttft_s - sim[0].ttft_s)
    return max(0.0, statistics.median(diffs)) if diffs else 0.0


def rel_errors(sim: dict, real: dict) -> dict:
    out = {}
    for m, q in POINTS:
        s, r = (sim.get(m) or {}).get(q), (real.get(m) or {}).get(q)
        out[f"{m}_{q}"] = None if s is None or not r else abs(s - r) / r
    return out


def validate(args, profile, slo, dtype) -> tuple[float | None, list[dict]]:
    per_request = profile.cost.prefill_s
    wl = build_workload(workload_config(args, rate=1.0, n=args.max_requests))
    mean_prefill = sum(per_request([(r.input_tokens, 0)]) for r in wl.requests) / len(wl.requests)
    capacity = 1.0 / mean_prefill                     # a lone prefill instance's req/s
    rates = [round(f * capacity, 3) for f in args.load_levels]
    log(f"prefill capacity of one instance ~{capacity:.2f} req/s; validation rates {rates}")
    rows, worst = [], None
    for system in args.systems:
        try:
            runs = measure_real(system, args, slo, rates, dtype)
        except Exception as e:                          # noqa: BLE001 - report it, go on with the others
            emit({"validation": system, "error": str(e).splitlines()[0] if str(e) else type(e).__name__})
            continue
        path_s = path_overhead(profile, system, runs[0])
        emit({"calibration": system, "path_overhead_s": path_s,
              "rule": "median over the last 3 sequential warm-up requests of measured TTFT - simulated TTFT"})
        for rate, (wl, results, wall) in zip(rates, runs[1:]):
            real = summarize(results, *slo, wall)
            sim_results, stats = simulate(profile, wl.requests, sim_config(system, slo, path_s=path_s))
            sim = summarize(sim_results, *slo)
            errs = rel_errors(sim, real)
            row = {"validation": system, "rate_rps": rate, "requests": len(results), "real_failed": real["failed"],
                   "real": {m: real[m] for m in ("ttft", "tpot")}, "sim": {m: sim[m] for m in ("ttft", "tpot")},
                   "rel_error": errs, "sim_speedup": stats["speedup"]}
            emit(row)
            rows.append(row)
            goal = [v for k, v in errs.items() if k.endswith(("p50", "p99")) and v is not None]
            if goal:
                worst = max(goal + ([worst] if worst is not None else []))
    return worst, rows


# -------------------------------------------------------------------------------------------- scale

def _child(conn, profile_path, requests, cfg):
    import gc
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gc.collect()
    t0 = time.perf_counter()
    results, stats = simulate(load_profile(profile_path), requests, cfg)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = summarize(results)
    conn.send({"wall_s": wall, "virtual_s": stats["virtual_s"], "events": stats["events"],
               "peak_rss_growth_mib": (peak - base) / 1024, "completed": s["completed"], "failed": s["failed"],
               "ttft_p99_s": (s["ttft"] or {}).get("p99"), "tpot_p99_s": (s["tpot"] or {}).get("p99")})
    conn.close()


def timed_in_child(profile_path, requests, cfg) -> dict:
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_child, args=(b, profile_path, requests, cfg))
    p.start()
    out = a.recv()
    p.join()
    return out


def scale(args, profile_path, slo, middle_rate) -> float | None:
    cfg = SimConfig(prefill=128, decode=128, router=RouterConfig(role_policy=RolePolicyConfig(*slo)))
    full = build_workload(workload_config(args, rate=None, n=None)).requests
    headline = None
    for minutes in (15, 30, 60):
        reqs = [r for r in full if r.arrival_s < minutes * 60]
        m = timed_in_child(profile_path, reqs, cfg)
        m.update(scale="trace arrivals", instances=256, trace_minutes=minutes, requests=len(reqs),
                 speedup=m["virtual_s"] / m["wall_s"], us_per_request=m["wall_s"] / len(reqs) * 1e6)
        emit(m)
        headline = m["speedup"]
    factor = 128 * middle_rate / planner.offered_rate(full)
    for n in args.loaded_sizes:
        reqs = planner.scaled(full[:n], factor)
        m = timed_in_child(profile_path, reqs, cfg)
        m.update(scale="loaded (each P/D pair at the middle validation rate)", instances=256, requests=n,
                 rate_rps=128 * middle_rate, speedup=m["virtual_s"] / m["wall_s"],
                 us_per_request=m["wall_s"] / n * 1e6)
        emit(m)
    return headline


# ------------------------------------------------------------------------------------------ planner

def plan_and_check(args, profile, slo, dtype) -> float | None:
    wl = build_workload(workload_config(args, rate=1.0, n=args.max_requests))
    rows = planner.plan(profile, wl.requests, instances=2, ttft=slo[0], tpot=slo[1], attainment=0.9,
                        cands=planner.candidates(2, seqs=(256,), budgets=(2048,)))
    best = rows[0]
    emit({"planner": "ranked", "slo": slo, "rows": [{k: r[k] for k in ("label", "goodput_rps", "why")} for r in rows]})
    if best["goodput_rps"] <= 0 or args.skip_real:
        return None
    c = best["config"]
    system = "colocated" if c["colocated"] else ("fixed" if c["pools"] == "fixed" else "adaptive")
    state = {"rate": best["goodput_rps"], "passed": None, "failed": None, "probes": 0}

    def decide(last):
        """Step by 25% from the prediction until the 90% verdict flips (or probes run out)."""
        if last is None:
            return state["rate"]
        results, wall = last
        rate, att = state["rate"], summarize(results, *slo, wall)["attainment"] or 0.0
        emit({"planner": "probe", "system": system, "rate_rps": rate, "attainment": att})
        state["probes"] += 1
        if att >= 0.9:
            state["passed"] = max(state["passed"] or 0.0, rate)
            state["rate"] = rate * 1.25
        else:
            state["failed"] = min(state["failed"] or float("inf"), rate)
            state["rate"] = rate / 1.25
        done = state["passed"] is not None and state["failed"] is not None
        return None if done or state["probes"] >= args.planner_probes else state["rate"]
    measure_real(system, args, slo, decide, dtype)
    measured = state["passed"] or 0.0
    err = abs(best["goodput_rps"] - measured) / measured if measured else None
    emit({"planner": "check", "chosen": best["label"], "predicted_goodput_rps": best["goodput_rps"],
          "measured_goodput_rps": measured, "resolution": "25% steps", "rel_error": err})
    return err


# ---------------------------------------------------------------------------------------- migration

def migration_rate(args, profile, blocks: int, n_prefill: int, n_decode: int) -> float:
    """`args.migration_load` x the lesser of the prefill pool's and the KV-bound decode pool's capacity."""
    reqs = build_workload(workload_config(args, rate=1.0, n=args.migration_requests)).requests
    mean_in = sum(r.input_tokens for r in reqs) / len(reqs)
    mean_out = sum(r.output_tokens for r in reqs) / len(reqs)
    p_cap = n_prefill / (sum(profile.cost.prefill_s([(r.input_tokens, 0)]) for r in reqs) / len(reqs))
    conc = max(1.0, blocks / -(-(mean_in + mean_out) // profile.block_size))      # requests a decode KV holds
    step = profile.cost.decode_s(round(conc), round(conc * (mean_in + mean_out / 2)))
    d_cap = n_decode * conc / (mean_out * step)
    return args.migration_load * min(p_cap, d_cap)


def migration(args, profile, slo) -> tuple[float | None, float | None]:
    gains_ttft, gains_dec = [], []
    blocks = max(64, profile.num_blocks // args.migration_kv_divisor)
    n_p, n_d = args.migration_prefill, 64
    rate = migration_rate(args, profile, blocks, n_p, n_d)
    for cv in (2.0, 4.0):
        wl = build_workload(workload_config(args, rate=rate, n=args.migration_requests, arrival="gamma", cv=cv))
        out = {}
        for name, router in (("round_robin", RouterConfig(dispatch="round_robin", migration=False,
                                                          sample_interval_s=0.5)),
                             ("load_balanced", RouterConfig(migration=False, sample_interval_s=0.5)),
                             ("migration", RouterConfig(migration_policy=PolicyConfig(), sample_interval_s=0.5))):
            cfg = SimConfig(prefill=n_p, decode=n_d, router=router, num_blocks=blocks)
            results, stats = simulate(profile, wl.requests, cfg)
            s = summarize(results)
            out[name] = {"ttft_p99_s": (s["ttft"] or {}).get("p99"), "tpot_p99_s": (s["tpot"] or {}).get("p99"),
                         "itl_p99_s": (s["itl"] or {}).get("p99"), "failed": s["failed"],
                         "fragmentation": stats.get("fragmentation"), "migrations": stats["migrations"],
                         "preemptions": sum(i["preemptions"] for i in stats["instances"].values())}
        lb, mig = out["load_balanced"], out["migration"]
        g_t = lb["ttft_p99_s"] / mig["ttft_p99_s"] if mig["ttft_p99_s"] else None
        g_d = lb["tpot_p99_s"] / mig["tpot_p99_s"] if mig["tpot_p99_s"] else None
        emit({"migration_experiment": {"cv": cv, "prefill_instances": n_p, "decode_instances": n_d,
                                       "kv_blocks_per_instance": blocks, "rate_rps": rate,
                                       "requests": len(wl.requests), **out},
              "p99_ttft_gain": g_t, "p99_decode_gain": g_d})
        gains_ttft.append(g_t)
        gains_dec.append(g_d)
    valid = lambda xs: [x for x in xs if x is not None]            # noqa: E731
    return (min(valid(gains_ttft), default=None), min(valid(gains_dec), default=None))


# --------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--trace", default=TRACE)
    p.add_argument("--profile", help="use this profile instead of measuring one")
    p.add_argument("--out-dir", default="bench-sim")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--load-levels", default="0.3,0.55,0.8", help="fractions of one prefill instance's capacity")
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-output-tokens", type=int, default=128)
    p.add_argument("--run-s", type=float, default=50.0, help="seconds of arrivals per real run")
    p.add_argument("--min-requests", type=int, default=40)
    p.add_argument("--max-requests", type=int, default=200)
    p.add_argument("--loaded-sizes", default="5000,10000,19000", help="requests (the conversation trace has 19,366 rows)")
    p.add_argument("--planner-probes", type=int, default=4)
    p.add_argument("--migration-load", type=float, default=0.85,
                   help="offered rate as a share of the 64-decode cluster's capacity (prefill or KV bound)")
    p.add_argument("--migration-prefill", type=int, default=32)
    p.add_argument("--migration-requests", type=int, default=6000)
    p.add_argument("--migration-kv-divisor", type=int, default=16, help="decode KV = the profile's blocks / this")
    p.add_argument("--skip-real", action="store_true", help="simulation only (no cluster runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.load_levels = [float(x) for x in args.load_levels.split(",")]
    args.loaded_sizes = [int(x) for x in args.loaded_sizes.split(",")]
    os.makedirs(args.out_dir, exist_ok=True)
    host = host_line()
    host["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    emit({"host": host})
    from loadgen.bench_systems import host_dtype
    dtype, why = host_dtype()
    profile_path = args.profile or os.path.join(args.out_dir, "profile.json")
    if not args.profile:
        from tandem.sim.profile import build_profile, fit_table, measure_engine, measure_transfer
        t0 = time.perf_counter()
        m = measure_engine(args.model, dtype=dtype, threads=1, log=log)
        save_profile(build_profile(m, measure_transfer(), host), profile_path)
        log(f"profiled in {time.perf_counter() - t0:.0f} s")
    profile = load_profile(profile_path)
    from tandem.sim.profile import fit_table
    print(fit_table(profile), file=sys.stderr)
    emit({"profile": profile_path, "dtype": profile.dtype, "dtype_why": why, "fit": {
        k: {"mean_rel_error": profile.fit[k]["mean_rel_error"], "max_rel_error": profile.fit[k]["max_rel_error"]}
        for k in ("prefill", "decode", "mixed_step_check")}})
    mean_prompt = 300
    slo = (5 * profile.cost.prefill_s([(mean_prompt, 0)]), 3 * profile.cost.decode_s(1, mean_prompt))
    emit({"slo": {"ttft_s": slo[0], "tpot_s": slo[1], "rule": "5x prefill of a 300-token prompt, 3x batch-1 decode"}})

    max_err = None
    if not args.skip_real:
        max_err, _ = validate(args, profile, slo, dtype)
    wl = build_workload(workload_config(args, rate=1.0, n=args.max_requests))
    mean_prefill = sum(profile.cost.prefill_s([(r.input_tokens, 0)]) for r in wl.requests) / len(wl.requests)
    middle = args.load_levels[len(args.load_levels) // 2] / mean_prefill
    speedup = scale(args, profile_path, slo, middle)
    plan_err = plan_and_check(args, profile, slo, dtype)
    g_ttft, g_dec = migration(args, profile, slo)
    emit({"max_rel_error": max_err, "speedup_256": speedup, "planner_rel_error": plan_err,
          "migration_p99_ttft_gain": g_ttft, "migration_p99_decode_gain": g_dec})
    return 0


if __name__ == "__main__":
    sys.exit(main())
