"""Adaptive pools: which instance should serve which phases now. Pure functions, no I/O, no clock.

An instance has a home role (prefill or decode, as started) and a current role. With adaptive
pools the leading router may switch it to BOTH (proto ROLE_COLOCATED: it prefills and decodes whole
requests itself, and still serves its home phase for disaggregated ones) and back home, from
measured loads and the SLOs (Llumnix's role switching; "semi-PD"):

- Prefill pressure: the least predicted prefill wait of the prefill-capable instances
  (queued prompt tokens / measured prefill rate) exceeds `prefill_pressure` × TTFT SLO.
- Decode pressure: a decode-capable instance's step time exceeds `decode_pressure` × TPOT SLO, or
  its free KV blocks fall under `min_free_fraction` of its total.

Rules, for instances in state "serving" whose last switch is at least `dwell_s` old:
1. A home-decode instance in DECODE switches to BOTH under prefill pressure when it has decode
   headroom (step time < `headroom` × TPOT SLO, free blocks above `min_free_fraction`).
   Its mixed_prefill_tokens is the prompt tokens a step may add: the TPOT room its decodes have,
   (tpot_target × SLO − step time), at its prefill rate, times `amortize_steps` — TPOT is a mean
   over a request's tokens, so one longer step spreads over many tokens of every running
   request — clamped to [min_mixed_tokens, max_mixed_tokens].
2. A home-prefill instance in PREFILL switches to BOTH under decode pressure when it has no
   prefill pressure itself (its own wait < `idle_wait` × TTFT SLO): it then decodes what it
   prefills, which takes load off the decode pool. Its prompts are not capped beside those decodes
   (mixed_prefill_tokens 0): prefill is its home phase, the decodes are its guests (a cap sized for
   TPOT, 16 tokens a step when its decodes were slow, made a burst's prompts crawl through it:
   TTFTs of 1-2 s where the fixed pools had 0.2 s).
3. An instance in BOTH goes home when its reason has gone (no prefill pressure and its wait below
   `idle_wait` × TTFT SLO for a home-decode instance; no decode pressure for a home-prefill one),
   or when serving both hurts its home phase (decode pressure on a home-decode instance).
A switch never touches requests: running ones finish where they are (a role only says what new
work an instance takes). At most one instance switches per call, the most pressed first, so each
switch is measured before the next.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from router.prefill_rate import prefill_rate
from services.roles import Role, WorkerState
from tandem.v1 import worker_pb2

LoadReport = worker_pb2.LoadReport
PREFILL, DECODE, BOTH = Role.PREFILL, Role.DECODE, Role.COLOCATED


@dataclasses.dataclass(frozen=True)
class RolePolicyConfig:
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    prefill_pressure: float = 0.3     # × TTFT SLO of predicted prefill wait
    idle_wait: float = 0.05           # × TTFT SLO: a prefill queue this short is idle
    decode_pressure: float = 0.85     # × TPOT SLO of step time
    headroom: float = 0.6             # × TPOT SLO of step time: room to take prefill chunks
    tpot_target: float = 0.8          # × TPOT SLO: what decodes may average beside prefill chunks
    amortize_steps: int = 8           # a chunk may use this many steps' TPOT room at once
    min_free_fraction: float = 0.1
    min_mixed_tokens: int = 16
    max_mixed_tokens: int = 512
    dwell_s: float = 2.0              # no instance switches twice within this


@dataclasses.dataclass(frozen=True)
class RoleDecision:
    instance_id: str
    role: int                          # worker_pb2.Role to switch to
    mixed_prefill_tokens: int          # cap on prompt tokens per step beside decodes (0: none)
    reason: str                        # for logs and metrics


def prefill_wait_s(r: LoadReport) -> float:
    rate = prefill_rate(r)
    return r.queued_prefill_tokens / rate


def _free_fraction(r: LoadReport) -> float:
    return r.free_blocks / r.total_blocks if r.total_blocks else 0.0


def _decode_pressed(r: LoadReport, c: RolePolicyConfig) -> bool:
    return (r.running > 0 and r.step_time_ms / 1e3 > c.decode_pressure * c.tpot_slo_s) \
        or _free_fraction(r) < c.min_free_fraction


def mixed_tokens(r: LoadReport, c: RolePolicyConfig) -> int:
    """Prompt tokens per step r can add beside its decodes (rule 1 of the module docstring)."""
    rate = prefill_rate(r)
    room_s = c.tpot_target * c.tpot_slo_s - (r.step_time_ms / 1e3 if r.running else 0.0)
    return int(min(c.max_mixed_tokens, max(c.min_mixed_tokens, room_s * rate * c.amortize_steps)))


def decide(loads: Iterable[LoadReport], home: Mapping[str, int], last_switch: Mapping[str, float],
           now: float, c: RolePolicyConfig) -> RoleDecision | None:
    """The one switch to make now, or None. home: instance_id → home role (PREFILL or DECODE);
    instances missing from it, or at home COLOCATED, are never switched. last_switch: instance_id →
    time of its last switch, on the same clock as `now`."""
    serving = [r for r in loads if r.state == WorkerState.SERVING]
    prefill_capable = [r for r in serving if r.role in (PREFILL, BOTH)]
    decode_capable = [r for r in serving if r.role in (DECODE, BOTH)]
    least_wait = min((prefill_wait_s(r) for r in prefill_capable), default=0.0)
    prefill_pressure = least_wait > c.prefill_pressure * c.ttft_slo_s
    decode_pressure = bool(decode_capable) and all(_decode_pressed(r, c) for r in decode_capable)

    def free_to_switch(r: LoadReport) -> bool:
        return home.get(r.instance_id) in (PREFILL, DECODE) and \
            now - last_switch.get(r.instance_id, float("-inf")) >= c.dwell_s

    candidates: list[tuple[float, RoleDecision]] = []
    for r in filter(free_to_switch, serving):
        h, wait, step_s = home[r.instance_id], prefill_wait_s(r), r.step_time_ms / 1e3 if r.running else 0.0
        if r.role == BOTH:
            if h == DECODE and (_decode_pressed(r, c) or (not prefill_pressure and wait < c.idle_wait * c.ttft_slo_s)):
                why = "decode pressure on a decode instance taking prefill" if _decode_pressed(r, c) else "prefill pressure gone"
                candidates.append((step_s, RoleDecision(r.instance_id, DECODE, 0, why)))
            elif h == PREFILL and (not decode_pressure or wait > c.prefill_pressure * c.ttft_slo_s):
                why = "decode pressure gone" if not decode_pressure else "prefill pressure on a prefill instance decoding"
                candidates.append((wait, RoleDecision(r.instance_id, PREFILL, 0, why)))
        elif r.role == DECODE and h == DECODE and prefill_pressure and not _decode_pressed(r, c) \
                and step_s < c.headroom * c.tpot_slo_s:
            candidates.append((least_wait, RoleDecision(r.instance_id, BOTH, mixed_tokens(r, c),
                                                        f"prefill wait {least_wait:.2f}s")))
        elif r.role == PREFILL and h == PREFILL and decode_pressure and wait < c.idle_wait * c.ttft_slo_s:
            pressed = max(decode_capable, key=lambda d: d.step_time_ms)
            candidates.append((pressed.step_time_ms / 1e3, RoleDecision(
                r.instance_id, BOTH, 0, f"decode step {pressed.step_time_ms:.0f}ms")))
    if not candidates:
        return None
    return max(candidates, key=lambda kv: (kv[0], kv[1].instance_id))[1]
