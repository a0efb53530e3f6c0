"""Adaptive pools: which instance should serve which phases now. Pure functions, no I/O, no clock.

An instance has a home role (prefill or decode, as started) and a current role. With adaptive
pools the leading router may switch it to BOTH (proto ROLE_COLOCATED: it prefills and decodes whole
requests itself, and still serves its home phase for disaggregated ones) and back home, from
measured loads and the SLOs (Llumnix's role switching; "semi-PD"):

- Prefill pressure: the least predicted prefill wait of the prefill-capable instances
  (queued prompt tokens / measured prefill rate) exceeds `prefill_pressure` × TTFT SLO.
- Decode pressure: a decode-capable instance's decode step time (its steps without prompt tokens:
  LoadReport.decode_step_time_ms, what its batch itself costs) exceeds `decode_pressure` × TPOT
  SLO, or its free KV blocks fall under `min_free_fraction` of its total. Steps a home-decode
  instance lengthens with the prompts it took are not decode pressure: counting them made it go
  home and, with it, switched the prefill instance to decoding whole requests, whose uncapped
  prompts then broke its own decodes' TPOT (measured: both switching every few seconds).

Rules, for instances in state "serving" whose last switch is at least `dwell_s` old:
1. A home-decode instance in DECODE switches to BOTH when it has decode headroom (decode step <
   `headroom` × TPOT SLO, free blocks above `min_free_fraction`): with `standing_share` (the
   default) whenever it has that headroom, else only under prefill pressure. A standing share
   does not send it any prompt by itself: placement (router/request/placement.py,
   pick_whole_request) gives it a request only when its predicted TTFT beats every prefill
   instance's, request by request. Prefill bursts on this trace last under a second; a switch
   made from pressure measured every interval_s and held for dwell_s came after them (measured:
   one switch in a 60 s probe, no request served whole, adaptive = fixed).
   Its mixed_prefill_tokens is the prompt tokens a step may add: the TPOT room its decodes have,
   (tpot_target × SLO − decode step), at its prefill rate, times `amortize_steps` — TPOT is a mean
   over a request's tokens, so one longer step spreads over many tokens of every running
   request — clamped to [min_mixed_tokens, max_mixed_tokens].
2. A home-prefill instance in PREFILL switches to BOTH under decode pressure when it has no
   prefill pressure itself (its own wait < `idle_wait` × TTFT SLO): it then decodes what it
   prefills, which takes load off the decode pool. Its prompts are not capped beside those decodes
   (mixed_prefill_tokens 0): prefill is its home phase, the decodes are its guests (a cap sized for
   TPOT, 16 tokens a step when its decodes were slow, made a burst's prompts crawl through it:
   TTFTs of 1-2 s where the fixed pools had 0.2 s).
3. An instance in BOTH goes home when its reason has gone (without a standing share: no prefill
   pressure and its wait below `idle_wait` × TTFT SLO for a home-decode instance; no decode
   pressure for a home-prefill one), or when serving both hurts its home phase (decode pressure on
   a home-decode instance).
4. A home-decode instance in BOTH whose cap is more than RECAP_RATIO away from what its decode
   step now allows (rule 1's sizing) gets the new cap (a SetRole to the role it has; not counted
   as a switch): a standing share is set when its decodes are light and lasts while they grow.
   Only while it has decodes running (without them no cap applies, and a cap sized for an empty
   batch would be wrong as soon as one starts) and when no switch is due.
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

RECAP_RATIO = 1.5     # rule 4: a cap this far from what its decode step now allows is set again


@dataclasses.dataclass(frozen=True)
class RolePolicyConfig:
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.1
    prefill_pressure: float = 0.3     # × TTFT SLO of predicted prefill wait
    idle_wait: float = 0.05           # × TTFT SLO: a prefill queue this short is idle
    decode_pressure: float = 0.85     # × TPOT SLO of step time
    headroom: float = 0.6             # × TPOT SLO of step time: room to take prefill chunks
    tpot_target: float = 0.8          # × TPOT SLO: what decodes may average beside prefill chunks
    amortize_steps: int = 4           # a chunk may use this many steps' TPOT room at once
    min_free_fraction: float = 0.1
    min_mixed_tokens: int = 16
    max_mixed_tokens: int = 512
    dwell_s: float = 2.0              # no instance switches twice within this (nor re-caps)
    standing_share: bool = True       # rule 1: a decode instance with headroom takes prefill without pressure


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


def decode_step_s(r: LoadReport) -> float:
    """Seconds a step of r's decode batch alone takes (LoadReport.decode_step_time_ms; its mean step
    while it reports none), 0 without running requests."""
    if not r.running:
        return 0.0
    return (r.decode_step_time_ms or r.step_time_ms) / 1e3


def _decode_pressed(r: LoadReport, c: RolePolicyConfig) -> bool:
    return decode_step_s(r) > c.decode_pressure * c.tpot_slo_s or _free_fraction(r) < c.min_free_fraction


def mixed_tokens(r: LoadReport, c: RolePolicyConfig) -> int:
    """Prompt tokens per step r can add beside its decodes (rule 1 of the module docstring)."""
    rate = prefill_rate(r)
    room_s = c.tpot_target * c.tpot_slo_s - decode_step_s(r)
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
        h, wait, step_s = home[r.instance_id], prefill_wait_s(r), decode_step_s(r)
        if r.role == BOTH:
            if h == DECODE and (_decode_pressed(r, c) or (not c.standing_share and not prefill_pressure
                                                          and wait < c.idle_wait * c.ttft_slo_s)):
                why = "decode pressure on a decode instance taking prefill" if _decode_pressed(r, c) else "prefill pressure gone"
                candidates.append((step_s, RoleDecision(r.instance_id, DECODE, 0, why)))
            elif h == DECODE and r.mixed_prefill_tokens and r.running and \
                    not 1 / RECAP_RATIO < mixed_tokens(r, c) / r.mixed_prefill_tokens < RECAP_RATIO:
                want = mixed_tokens(r, c)      # rule 4: its decode batch changed since the cap was set
                candidates.append((-1.0, RoleDecision(r.instance_id, BOTH, want, f"re-cap {r.mixed_prefill_tokens} -> "
                                                      f"{want} tokens/step (decode step {step_s * 1e3:.0f}ms)")))
            elif h == PREFILL and (not decode_pressure or wait > c.prefill_pressure * c.ttft_slo_s):
                why = "decode pressure gone" if not decode_pressure else "prefill pressure on a prefill instance decoding"
                candidates.append((wait, RoleDecision(r.instance_id, PREFILL, 0, why)))
        elif r.role == DECODE and h == DECODE and (prefill_pressure or c.standing_share) \
                and not _decode_pressed(r, c) and step_s < c.headroom * c.tpot_slo_s:
            why = f"prefill wait {least_wait:.2f}s" if prefill_pressure else f"standing prefill share (step {step_s * 1e3:.0f}ms)"
            candidates.append((least_wait, RoleDecision(r.instance_id, BOTH, mixed_tokens(r, c), why)))
        elif r.role == PREFILL and h == PREFILL and decode_pressure and wait < c.idle_wait * c.ttft_slo_s:
            pressed = max(decode_capable, key=decode_step_s)
            candidates.append((decode_step_s(pressed), RoleDecision(
                r.instance_id, BOTH, 0, f"decode step {decode_step_s(pressed) * 1e3:.0f}ms")))
    if not candidates:
        return None
    return max(candidates, key=lambda kv: (kv[0], kv[1].instance_id))[1]
