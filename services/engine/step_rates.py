"""The engine's speed as the load record reports it (LoadReport.step_time_ms, prefill_tokens_per_s):
moving averages over the steps it ran, kept on the engine thread.

- step_ms: every step that computed something.
- prefill_tokens_per_s: the speed of prefill itself. A step of prefill chunks only counts as
  tokens ÷ its time. A step that also decodes counts as tokens ÷ (its time − a decode-only step's),
  the time the chunk added, and only where that is at least MIN_PREFILL_SHARE of the step: a small
  chunk beside a large decode batch (a colocated instance's capped prefill, 16 tokens in a 36 ms
  step) says little about prefill speed, and dividing by the whole step read 440 tokens/s where
  prefill ran at ~5000, which the role policy took for a 10 s prefill queue.
"""
from __future__ import annotations

SMOOTHING = 0.2               # weight of the newest step in each moving average
MIN_PREFILL_SHARE = 1 / 3     # of a mixed step's time, for its prefill to be measured


def _ema(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new if old else new


class StepRates:
    def __init__(self):
        self.step_ms = 0.0
        self.decode_step_ms = 0.0       # steps that only decoded
        self.prefill_tokens_per_s = 0.0  # 0 until a step measured it

    def observe(self, step_s: float, prefill_tokens: int, decodes: int) -> None:
        """One step: its wall time, prompt tokens computed, requests decoded."""
        if step_s <= 0 or not (prefill_tokens or decodes):
            return
        self.step_ms = _ema(self.step_ms, step_s * 1e3)
        if not prefill_tokens:
            self.decode_step_ms = _ema(self.decode_step_ms, step_s * 1e3)
            return
        prefill_s = step_s
        if decodes:
            if not self.decode_step_ms:
                return                  # nothing to subtract yet
            prefill_s = step_s - self.decode_step_ms / 1e3
            if prefill_s < MIN_PREFILL_SHARE * step_s:
                return
        self.prefill_tokens_per_s = _ema(self.prefill_tokens_per_s, prefill_tokens / prefill_s)
