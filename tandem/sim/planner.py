"""`tandem plan`: search cluster shapes with the simulator for the most goodput under SLOs.

For N instances the search covers every P:D split (1..N−1 prefill), colocated ×N, and each split
with adaptive pools; for each, the engine's max_num_seqs and token budget (chunk size) from a small
grid, and every queue policy the engine has. A configuration's goodput is the highest arrival rate
(the trace's arrivals compressed or stretched) at which at least `attainment` of requests meet
both SLOs, found by bracketing and bisection on the simulator (DistServe's search, Tandem's policies).
Goodput per instance = that rate / N. Ranked best first; ties go to the simpler configuration.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from loadgen.metrics import summarize
from loadgen.workloads import RequestSpec
from services.engine.policy import POLICIES as QUEUE_POLICIES
from tandem.sim.costmodel import Profile
from tandem.sim.router import RouterConfig
from tandem.sim.simulator import SimConfig, simulate
from router.cluster.role_policy import RolePolicyConfig

MAX_NUM_SEQS = (256, 64, 16)
BUDGETS = (2048, 512)


class PlanError(ValueError):
    """Planning cannot proceed; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    prefill: int
    decode: int
    colocated: int
    pools: str
    max_num_seqs: int
    max_num_batched_tokens: int
    queue_policy: str

    @property
    def label(self) -> str:
        shape = f"colocated x{self.colocated}" if self.colocated else f"{self.prefill}P+{self.decode}D {self.pools}"
        return f"{shape} seqs={self.max_num_seqs} budget={self.max_num_batched_tokens} {self.queue_policy}"

    def config(self, ttft: float, tpot: float) -> SimConfig:
        router = RouterConfig(pools=self.pools, role_policy=RolePolicyConfig(ttft_slo_s=ttft, tpot_slo_s=tpot))
        return SimConfig(prefill=self.prefill, decode=self.decode, colocated=self.colocated, router=router,
                         queue_policy=self.queue_policy, max_num_seqs=self.max_num_seqs,
                         max_num_batched_tokens=self.max_num_batched_tokens)


def candidates(instances: int, seqs: Sequence[int] = MAX_NUM_SEQS, budgets: Sequence[int] = BUDGETS,
               queue_policies: Sequence[str] | None = None) -> list[Candidate]:
    if instances < 2:
        raise PlanError(f"--instances {instances}: plan at least 2 instances (one prefill and one decode, "
                        "or two colocated)")
    shapes = [(p, instances - p, 0, "fixed") for p in range(1, instances)]
    shapes += [(p, instances - p, 0, "adaptive") for p in range(1, instances)]
    shapes += [(0, 0, instances, "fixed")]
    pols = list(queue_policies or [p for p in QUEUE_POLICIES if p != "priority"] or ["fcfs"])
    return [Candidate(p, d, c, pools, s, b, q) for p, d, c, pools in shapes for s in seqs for b in budgets
            for q in pols]


def scaled(requests: Sequence[RequestSpec], factor: float) -> list[RequestSpec]:
    """The same requests with arrival offsets divided by `factor` (factor 2: twice the rate)."""
    return [dataclasses.replace(r, arrival_s=r.arrival_s / factor) for r in requests]


def offered_rate(requests: Sequence[RequestSpec]) -> float:
    span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
    return (len(requests) - 1) / span if span > 0 else 1.0


def goodput(profile: Profile, requests: Sequence[RequestSpec], cand: Candidate, ttft: float, tpot: float,
            attainment: float, bracket_steps: int = 8, bisect_steps: int = 6) -> dict:
    """{"rate": best req/s meeting `attainment` (0.0 if none), "attainment_best": the best
    attainment seen, "probe": the summary at the best rate (or the best attainment), "stats"}."""
    base = offered_rate(requests)
    cfg = cand.config(ttft, tpot)
    seen: dict[float, tuple[dict, dict]] = {}

    def probe(factor: float) -> bool:
        results, stats = simulate(profile, scaled(requests, factor), cfg)
        s = summarize(results, ttft, tpot)
        seen[factor] = (s, stats)
        return (s["attainment"] or 0.0) >= attainment

    lo = hi = None
    f = 1.0
    if probe(f):
        lo = f
        for _ in range(bracket_steps):
            if not probe(lo * 2):
                hi = lo * 2
                break
            lo *= 2
    else:
        hi = f
        for _ in range(bracket_steps):
            if probe(hi / 2):
                lo = hi / 2
                break
            hi /= 2
    if lo is not None and hi is not None:
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    best_att = max((s["attainment"] or 0.0) for s, _ in seen.values())
    key = lo if lo is not None else max(seen, key=lambda k: seen[k][0]["attainment"] or 0.0)
    s, stats = seen[key]
    return {"rate": base * lo if lo is not None else 0.0, "attainment_best": best_att, "probe": s, "stats": stats,
            "probes": len(seen)}


def why(cand: Candidate, result: dict) -> str:
    """The bottleneck at the best rate: which pool was busiest, which SLO failed first."""
    st, s = result["stats"], result["probe"]
    virtual = max(st["virtual_s"], 1e-9)
    busy: dict[str, list[float]] = {}
    for iid, i in st["instances"].items():
        busy.setdefault(iid.rsplit("-", 1)[0], []).append(i["busy_s"] / virtual)
    parts = [f"{pool} busy {sum(v) / len(v):.0%}" for pool, v in sorted(busy.items())]
    att_ttft, att_tpot = s.get("attainment_ttft") or 0.0, s.get("attainment_tpot") or 0.0
    limit = "TTFT" if att_ttft < att_tpot else "TPOT" if att_tpot < att_ttft else "both"
    return ", ".join(parts) + f"; {limit} SLO binds (TTFT met {att_ttft:.0%}, TPOT met {att_tpot:.0%})"


def plan(profile: Profile, requests: Sequence[RequestSpec], *, instances: int, ttft: float, tpot: float,
         attainment: float = 0.9, cands: Sequence[Candidate] | None = None, log=None) -> list[dict]:
    """Every candidate with its goodput, best first. Raises PlanError for no usable requests or bad SLOs."""
    if not requests:
        raise PlanError("--trace: no usable rows (every row had a zero length or was filtered out)")
    for flag, v in (("--slo-ttft", ttft), ("--slo-tpot", tpot)):
        if not v > 0:
            raise PlanError(f"{flag} {v}: give a positive number of seconds")
    if not 0 < attainment <= 1:
        raise PlanError(f"--attainment {attainment}: give a fraction in (0, 1], e.g. 0.9")
    rows = []
    for cand in cands or candidates(instances):
        r = goodput(profile, requests, cand, ttft, tpot, attainment)
        rows.append({"config": dataclasses.asdict(cand), "label": cand.label, "goodput_rps": r["rate"],
                     "goodput_per_instance_rps": r["rate"] / instances, "attainment_best": r["attainment_best"],
                     "ttft_p90_s": (r["probe"]["ttft"] or {}).get("p90"), "tpot_p90_s": (r["probe"]["tpot"] or {}).get("p90"),
                     "why": why(cand, r), "probes": r["probes"]})
        if log:
            log(f"{cand.label}: {r['rate']:.3g} req/s")
    simple = lambda row: (row["config"]["pools"] != "fixed", row["config"]["colocated"] == 0)   # noqa: E731
    rows.sort(key=lambda row: (-row["goodput_rps"], simple(row), row["label"]))
    return rows


def table(rows: list[dict], top: int = 10) -> str:
    lines = [f"{'rank':<5}{'configuration':<52}{'goodput/inst':>13}{'goodput':>10}  why"]
    for i, row in enumerate(rows[:top], 1):
        lines.append(f"{i:<5}{row['label']:<52}{row['goodput_per_instance_rps']:>13.3g}{row['goodput_rps']:>10.3g}"
                     f"  {row['why']}")
    return "\n".join(lines)


def helm_values(row: dict, profile: Profile, ttft: float, tpot: float) -> dict:
    """Values for k8s/tandem (keys of its values.yaml) that run the configuration of `row`."""
    c = row["config"]
    return {"model": {"name": profile.model, "dtype": profile.dtype},
            "engine": {"blockSize": profile.block_size, "maxNumBatchedTokens": c["max_num_batched_tokens"],
                       "maxNumSeqs": c["max_num_seqs"]},
            "router": {"pools": c["pools"], "slo": {"ttftSeconds": ttft, "tpotSeconds": tpot}},
            "prefill": {"replicas": c["prefill"]}, "decode": {"replicas": c["decode"]},
            "colocated": {"replicas": c["colocated"]}}


def write_helm_values(values: dict, path: str, header: str) -> None:
    import yaml
    with open(path, "w") as f:
        f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(values, f, sort_keys=False)
