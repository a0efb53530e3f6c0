"""One simulated run: a cluster shape, a profile and a workload in; per-request results out.

    results, stats = simulate(profile, workload.requests, SimConfig(prefill=1, decode=1))

Deterministic: the same inputs give the same results (no wall clock, no unseeded randomness;
ties in the event loop run in scheduling order, ties in placement go to the smallest id).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from loadgen.metrics import RequestResult
from loadgen.workloads import RequestSpec
from services.engine.queue_order import DEFAULT_QUEUE_POLICY
from tandem.sim.clock import EventLoop
from tandem.sim.costmodel import Profile
from tandem.sim.instance import COLOCATED, DECODE, PREFILL, SimInstance
from tandem.sim.request import SimRequest
from tandem.sim.router import RouterConfig, SimRouter


class SimConfigError(ValueError):
    """A cluster shape or setting the simulator cannot run; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class SimConfig:
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    router: RouterConfig = RouterConfig()
    queue_policy: str = DEFAULT_QUEUE_POLICY     # the engine's policy (services/engine/policy.py); the cluster's default
    max_num_batched_tokens: int | None = None    # None: the profile's
    max_num_seqs: int | None = None
    num_blocks: int | None = None
    path_s: float = 0.0                          # router → client per message (network, forwarding)
    layer_group: int = 2                         # layers per KV push (services.worker --layer-group)

    def check(self) -> None:
        if min(self.prefill, self.decode, self.colocated) < 0:
            raise SimConfigError("--prefill/--decode/--colocated must be >= 0")
        if (self.prefill == 0) != (self.decode == 0):
            raise SimConfigError("--prefill and --decode come in pairs: give both (or neither and --colocated)")
        if self.prefill + self.decode + self.colocated == 0:
            raise SimConfigError("the cluster has no instance: give --prefill N --decode M or --colocated K")
        from services.engine.policy import POLICIES
        if self.queue_policy not in POLICIES:
            raise SimConfigError(f"--queue-policy {self.queue_policy}: give one of {', '.join(POLICIES)}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "num_blocks"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SimConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["router"] = {k: v for k, v in d["router"].items()}
        return d


def build_instances(loop: EventLoop, profile: Profile, cfg: SimConfig) -> list[SimInstance]:
    kw = dict(num_blocks=cfg.num_blocks or profile.num_blocks, block_size=profile.block_size,
              max_num_batched_tokens=cfg.max_num_batched_tokens or profile.max_num_batched_tokens,
              max_num_seqs=cfg.max_num_seqs or profile.max_num_seqs, policy=cfg.queue_policy, path_s=cfg.path_s)
    out = [SimInstance(loop, profile.cost, f"prefill-{i}", PREFILL, **kw) for i in range(cfg.prefill)]
    out += [SimInstance(loop, profile.cost, f"decode-{i}", DECODE, **kw) for i in range(cfg.decode)]
    out += [SimInstance(loop, profile.cost, f"colocated-{i}", COLOCATED, **kw) for i in range(cfg.colocated)]
    return out


def simulate(profile: Profile, requests: Sequence[RequestSpec], cfg: SimConfig) -> tuple[list[RequestResult], dict]:
    """(results in request order, run stats). Latencies count from each request's arrival."""
    cfg.check()
    t0 = time.perf_counter()
    loop = EventLoop()
    instances = build_instances(loop, profile, cfg)
    # KV streams layer group by layer group during the prefill: only the last group's bytes are
    # on the critical path after the first token (the worker's --layer-group, 2 by default)
    tail = min(1.0, cfg.layer_group / profile.num_layers) if profile.num_layers else 1.0
    router = SimRouter(loop, profile.cost, instances, cfg.router, kv_tail_fraction=tail)
    sims = [SimRequest(s.index, s.arrival_s, s.input_tokens, s.output_tokens) for s in requests]
    for r in sims:
        loop.at(r.arrival_time, router.submit, r)
    loop.run()
    for inst in instances:
        inst.check_integrity(idle=router.live == 0 and not router.queue)
    for r in sims:
        if r.result.end_s is None and r.result.error is None:
            r.result.error = "unfinished when the simulation ran out of events"
    virtual = max((r.result.end_s or r.arrival_time) for r in sims) if sims else 0.0
    wall = time.perf_counter() - t0
    stats = {"virtual_s": virtual, "wall_s": wall, "speedup": virtual / wall if wall > 0 else None,
             "events": loop.events_run, "role_switches": router.role_switches, "migrations": router.migrations,
             "fragmentation": router.fragmentation(),
             "instances": {i.instance_id: {"role": i.role, "home_role": i.home_role, "steps": i.steps,
                                           "busy_s": i.busy_s, "preemptions": i.preemptions} for i in instances}}
    return [r.result for r in sims], stats
