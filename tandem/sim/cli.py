"""`tandem profile`, `tandem simulate`, `tandem plan`: registered on the `tandem` parser by tandem/cli.py.

Bad input (a missing or foreign profile, an unusable trace, a bad number) exits 2 with one line
naming the flag and the fix; `plan` exits 1 when no configuration meets the SLOs at any rate tried.
"""
from __future__ import annotations

import argparse
import json
import sys

from router.migration.policy import POLICIES as MIGRATION_POLICIES
from router.migration.policy import PolicyConfig
from router.cluster.role_policy import RolePolicyConfig


class CliError(ValueError):
    """A user error: printed as `tandem <command>: error: …`, exit 2."""


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a value > 0")
        return v
    parse.__name__ = kind.__name__
    return parse


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="any trace loadgen reads (Azure CSV, ShareGPT stats, Mooncake, "
                                                  "synthetic:…)")
    p.add_argument("--max-requests", type=_positive(int))
    p.add_argument("--sample", action="store_true", help="a seeded sample of --max-requests rows, not the first")
    p.add_argument("--rate", type=_positive(float), help="requests/s (rescales trace arrivals)")
    p.add_argument("--time-scale", type=_positive(float), default=1.0)
    p.add_argument("--arrival", choices=("trace", "poisson", "gamma", "constant"))
    p.add_argument("--cv", type=_positive(float), default=1.0)
    p.add_argument("--max-input-tokens", type=_positive(int))
    p.add_argument("--max-output-tokens", type=_positive(int))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="refuse a profile of another model")
    p.add_argument("--dtype", help="refuse a profile of another dtype")


def _workload(args):
    from loadgen.workloads import WorkloadConfig, WorkloadError, build_workload
    try:
        wl = build_workload(WorkloadConfig(trace=args.trace, max_requests=args.max_requests, sample=args.sample,
                                           arrival=args.arrival, rate=args.rate, time_scale=args.time_scale,
                                           cv=args.cv, max_input_tokens=args.max_input_tokens,
                                           max_output_tokens=args.max_output_tokens, seed=args.seed))
    except (WorkloadError, OSError) as e:
        raise CliError(f"--trace {args.trace}: {e}") from None
    if not wl.requests:
        raise CliError(f"--trace {args.trace}: no usable rows; give a trace with positive lengths")
    return wl


def _profile(args):
    from tandem.sim.costmodel import ProfileError, load_profile
    try:
        prof = load_profile(args.profile)
    except ProfileError as e:
        raise CliError(str(e)) from None
    if args.model and args.model != prof.model:
        raise CliError(f"--profile {args.profile} was measured on model {prof.model!r}, not {args.model!r}: "
                       f"run `tandem profile --model {args.model} --out …` and plan with that")
    if args.dtype and args.dtype != prof.dtype:
        raise CliError(f"--profile {args.profile} was measured in {prof.dtype}, not {args.dtype}: "
                       f"profile with --dtype {args.dtype}")
    return prof


# ------------------------------------------------------------------------------------------- profile

def cmd_profile(args) -> int:
    from tandem.sim.costmodel import save_profile
    from tandem.sim.profile import build_profile, fit_table, measure_engine, measure_transfer
    log = (lambda s: print(s, file=sys.stderr))
    m = measure_engine(args.model, dtype=args.dtype or "auto", device=args.device, threads=args.threads,
                       repeats=args.repeats, log=log)
    prof = build_profile(m, measure_transfer(), _host())
    save_profile(prof, args.out)
    print(fit_table(prof))
    print(json.dumps({"profile": args.out, "model": prof.model, "dtype": prof.dtype,
                      "prefill_mean_rel_error": prof.fit["prefill"]["mean_rel_error"],
                      "decode_mean_rel_error": prof.fit["decode"]["mean_rel_error"], "host": prof.host}))
    return 0


def _host() -> dict:
    try:
        from benchmarks.host_info import host_line
    except ImportError:                    # an installed copy without the repository's benchmarks/
        import os
        import platform
        return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    return host_line()


# ------------------------------------------------------------------------------------------ simulate

def sim_config(args):
    from tandem.sim.router import RouterConfig
    from tandem.sim.simulator import SimConfig
    names = [p for p in (args.policies or "").split(",") if p] if args.policies is not None else list(MIGRATION_POLICIES)
    migration = names != ["none"]
    if migration:
        bad = [p for p in names if p not in MIGRATION_POLICIES]
        if bad:
            raise CliError(f"--policies {args.policies}: unknown {bad}; give a comma list of "
                           f"{', '.join(MIGRATION_POLICIES)}, or none")
    router = RouterConfig(pools=args.pools, dispatch=args.dispatch, migration=migration,
                          migration_policy=PolicyConfig(policies=tuple(names)) if migration else PolicyConfig(),
                          role_policy=RolePolicyConfig(ttft_slo_s=args.slo_ttft or RolePolicyConfig.ttft_slo_s,
                                                       tpot_slo_s=args.slo_tpot or RolePolicyConfig.tpot_slo_s))
    return SimConfig(prefill=args.prefill, decode=args.decode, colocated=args.colocated, router=router,
                     queue_policy=args.queue_policy, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks, path_s=args.path_ms / 1e3)


def cmd_simulate(args) -> int:
    from loadgen import report as rep
    from tandem.sim import report
    from tandem.sim.simulator import SimConfigError, simulate
    prof = _profile(args)
    wl = _workload(args)
    try:
        cfg = sim_config(args)
        results, stats = simulate(prof, wl.requests, cfg)
    except SimConfigError as e:
        raise CliError(str(e)) from None
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "out", "csv")}
    out = report.build(results, wl, config=cfg.describe(), profile_path=args.profile, stats=stats, seed=args.seed,
                       options=options, ttft_slo=args.slo_ttft, tpot_slo=args.slo_tpot)
    rep.write_json(out, args.out)
    if args.csv:
        rep.write_csv(results, args.csv)
    s = out["summary"]
    print(f"tandem simulate: {s['completed']} completed, {s['failed']} failed, {stats['virtual_s']:.1f} s simulated "
          f"in {stats['wall_s']:.2f} s ({stats['speedup']:.0f}x); report {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- plan

def cmd_plan(args) -> int:
    from tandem.sim import planner
    prof = _profile(args)
    wl = _workload(args)
    try:
        rows = planner.plan(prof, wl.requests, instances=args.instances, ttft=args.slo_ttft, tpot=args.slo_tpot,
                            attainment=args.attainment,
                            cands=planner.candidates(args.instances) if not args.quick else
                            planner.candidates(args.instances, seqs=(256,), budgets=(2048,)),
                            log=lambda s: print(s, file=sys.stderr))
    except planner.PlanError as e:
        raise CliError(str(e)) from None
    print(planner.table(rows, args.top))
    best = rows[0]
    if best["goodput_rps"] <= 0:
        top = max(rows, key=lambda r: r["attainment_best"])
        print(f"tandem plan: no configuration of {args.instances} instances meets TTFT <= {args.slo_ttft}s and "
              f"TPOT <= {args.slo_tpot}s for {args.attainment:.0%} of requests at any rate tried; the best attainment "
              f"was {top['attainment_best']:.1%} ({top['label']}): relax the SLOs, lower --attainment or add "
              f"--instances", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"instances": args.instances, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
                       "attainment": args.attainment, "profile": args.profile, "ranked": rows}, f, indent=2)
    if args.helm_values:
        values = planner.helm_values(best, prof, args.slo_ttft, args.slo_tpot)
        planner.write_helm_values(values, args.helm_values,
                                  f"tandem plan: {best['label']}\npredicted goodput {best['goodput_rps']:.3g} req/s "
                                  f"({best['goodput_per_instance_rps']:.3g} per instance) at "
                                  f"{args.attainment:.0%} attainment\n{best['why']}")
        print(f"tandem plan: wrote {args.helm_values} (helm template k8s/tandem -f {args.helm_values})", file=sys.stderr)
    print(json.dumps({"best": best["label"], "goodput_rps": best["goodput_rps"],
                      "goodput_per_instance_rps": best["goodput_per_instance_rps"]}))
    return 0


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure the engine here and fit the simulator's cost model")
    p.add_argument("--model", default="small", help="named model (tiny, small) or HF directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="auto (default), float32, bfloat16, float16")
    p.add_argument("--threads", type=_positive(int), default=1, help="torch threads (1: a pinned worker's core)")
    p.add_argument("--repeats", type=_positive(int), default=3)
    p.add_argument("--out", required=True, help="PROFILE.json")
    p.set_defaults(func=cmd_profile)

    s = sub.add_parser("simulate", help="simulate a cluster on a trace (loadgen report format)")
    s.add_argument("--profile", required=True)
    _add_workload_args(s)
    s.add_argument("--prefill", type=int, default=1)
    s.add_argument("--decode", type=int, default=1)
    s.add_argument("--colocated", type=int, default=0)
    s.add_argument("--pools", choices=("fixed", "adaptive"), default="fixed")
    s.add_argument("--policies", default=None,
                   help=f"rescheduler migration policies, comma list of {','.join(MIGRATION_POLICIES)} "
                        "(default: all), or none")
    s.add_argument("--dispatch", choices=("load", "round_robin"), default="load",
                   help="load: the router's placement (default); round_robin: a baseline")
    s.add_argument("--queue-policy", default="fcfs", help="the engine's queue policy")
    s.add_argument("--slo-ttft", type=_positive(float), help="seconds (attainment; adaptive pools protect it)")
    s.add_argument("--slo-tpot", type=_positive(float))
    s.add_argument("--max-num-batched-tokens", type=_positive(int))
    s.add_argument("--max-num-seqs", type=_positive(int))
    s.add_argument("--num-blocks", type=_positive(int))
    s.add_argument("--path-ms", type=float, default=0.0, help="router → client time per message")
    s.add_argument("--out", required=True)
    s.add_argument("--csv")
    s.set_defaults(func=cmd_simulate)

    q = sub.add_parser("plan", help="size the pools for goodput under SLOs; write Helm values")
    q.add_argument("--profile", required=True)
    _add_workload_args(q)
    q.add_argument("--slo-ttft", type=_positive(float), required=True)
    q.add_argument("--slo-tpot", type=_positive(float), required=True)
    q.add_argument("--instances", type=int, required=True)
    q.add_argument("--attainment", type=_positive(float), default=0.9)
    q.add_argument("--quick", action="store_true", help="shapes only (default engine limits)")
    q.add_argument("--top", type=_positive(int), default=10)
    q.add_argument("--out", help="ranked table as JSON")
    q.add_argument("--helm-values", help="values.yaml for k8s/tandem running the best configuration")
    q.set_defaults(func=cmd_plan)
