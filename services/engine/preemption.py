"""How a preempted request gives its blocks back: recompute, or keep its KV compressed (issue 16,
items 2 and 3; FastSwitch's point that a context switch is only fair when its cost is counted).

`SchedulerConfig.preemption_mode`:

- "recompute": drop the KV; prompt + output so far are computed again on re-admission (exact).
- "compress": keep an int8 copy (kv_compress.py) while the store's budget holds, else recompute.
- "auto": per victim, the cheaper of the two by measured cost:
      recompute = its computed tokens ÷ the measured prefill rate (prompt tokens/s)
      compress  = its blocks × (measured copy-out + restore seconds per block)
  and recompute while either is unmeasured (nothing lossy without evidence it pays).

Moving a request to another decode instance instead is the router's rescheduler's decision
(router/migration/policy.py, ahead of a shortage); an engine step that finds blocks short chooses
between these two. Counts per mode are the engine's `tandem_preemptions_total{mode}`.
"""
from __future__ import annotations

import time

from services.engine.step_rates import StepRates, _ema

PREEMPTION_MODES = ("recompute", "compress", "auto")
RECOMPUTE, COMPRESS = "recompute", "compress"


class PreemptionCosts:
    """Measured costs and the per-victim choice. For the engine thread only."""

    def __init__(self, mode: str = RECOMPUTE):
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {mode!r}")
        self.mode = mode
        self.rates = StepRates()              # fed by Engine.step: prefill_tokens_per_s
        self.copy_s_per_block = 0.0           # copy-out + restore, moving average (0: unmeasured)
        self._save_s_per_block = 0.0
        self._restore_s_per_block = 0.0
        self.counts = {RECOMPUTE: 0, COMPRESS: 0}
        self.restored = 0                     # compressed requests brought back
        self.no_room = 0                      # compress wanted, the store's budget was full
        self.displaced = 0                    # of the preemptions: sjf gave the slot to a shorter request

    def choose(self, num_tokens: int, num_blocks: int, store_has_room: bool, count: bool = True) -> str:
        """RECOMPUTE or COMPRESS for a victim with num_tokens computed in num_blocks blocks
        (count=False: a question only, the no-room counter stays)."""
        if self.mode == RECOMPUTE or num_blocks <= 0:
            return RECOMPUTE
        if self.mode == "auto":
            rate = self.rates.prefill_tokens_per_s
            if not (rate and self.copy_s_per_block):
                return RECOMPUTE
            if num_blocks * self.copy_s_per_block >= num_tokens / rate:
                return RECOMPUTE
        if not store_has_room:
            self.no_room += count
            return RECOMPUTE
        return COMPRESS

    def counted(self, mode: str) -> None:
        self.counts[mode] += 1

    def observe_copy(self, saved_blocks: int, save_s: float, restored_blocks: int, restore_s: float) -> None:
        """One step's copies: blocks compressed and restored, and the seconds each took."""
        if saved_blocks:
            self._save_s_per_block = _ema(self._save_s_per_block, save_s / saved_blocks)
        if restored_blocks:
            self._restore_s_per_block = _ema(self._restore_s_per_block, restore_s / restored_blocks)
        if self._save_s_per_block and self._restore_s_per_block:
            self.copy_s_per_block = self._save_s_per_block + self._restore_s_per_block

    def calibrate(self, save_and_restore) -> None:
        """Measure the copy cost once (save_and_restore(): seconds for one block out and back),
        so "auto" can decide from the first shortage."""
        t0 = time.perf_counter()
        save_and_restore()
        dt = time.perf_counter() - t0
        self.observe_copy(1, dt / 2, 1, dt / 2)
