"""Which way a CPU engine computes structured-output masks, chosen by measuring both on the live batch.

On a CPU whose cores all run the forward pass there are two ways to compute a step's grammar masks,
and which is faster depends on the host (measured by `make bench-structured`, batch 16: on a 2-core
Zen 4 host inline cost 8.6% of decode throughput against 12.3% overlapped; on a 2-core AMX Xeon 11.6%
against 7.8%):

- overlap: a helper thread computes them while the forward pass runs; it takes its time from a
  core the forward pass was using;
- inline: the sampler computes them after the forward pass, on every core, while the forward
  pass's threads wait.

`MaskModeChooser` measures instead of guessing. It alternates the two in runs of `run_steps`
constrained steps until each mode has `samples` measurements, keeps the mode whose median is lower
for the next `keep_steps` constrained steps, then measures again (a shared host's load changes). A
measurement is one step's time from the mask's start (before the forward pass) to the mask applied
(in the sampler): the forward pass plus what the mask added to it. The first step of each run is not
measured, so what one mode leaves behind (a helper still waking, cache state) is not charged to the
other. Steps of both modes come from the same stretch of the same batch, so the batch's own drift
cancels out.
"""
from __future__ import annotations

import logging
import statistics

log = logging.getLogger(__name__)


class MaskModeChooser:
    def __init__(self, run_steps: int = 4, samples: int = 12, keep_steps: int = 2000):
        """run_steps ≥ 2 (the first of a run is not measured), samples ≥ 1, keep_steps ≥ 1."""
        if run_steps < 2 or samples < 1 or keep_steps < 1:
            raise ValueError("run_steps must be >= 2, samples and keep_steps >= 1")
        self.run_steps, self.samples, self.keep_steps = run_steps, samples, keep_steps
        self.chosen: bool | None = None        # overlap? once measured; None while measuring
        self.choices = 0                       # measurements completed
        self._measured: dict[bool, list[float]] = {False: [], True: []}
        self._step = 0                         # constrained steps since measuring (or keeping) began

    @property
    def measuring(self) -> bool:
        return self.chosen is None

    def overlap(self) -> bool:
        """The mode of the next constrained step (True: overlap). Call once per step, then record()."""
        if not self.measuring:
            return self.chosen
        return (self._step // self.run_steps) % 2 == 1         # inline first, then overlap, by runs

    def record(self, overlap: bool, seconds: float) -> None:
        """The step that overlap() answered for took `seconds` from the mask's start to its use."""
        step, self._step = self._step, self._step + 1
        if not self.measuring:
            if self._step >= self.keep_steps:
                self.chosen, self._step = None, 0
                self._measured = {False: [], True: []}
            return
        if step % self.run_steps:                # not the first step of its run
            self._measured[overlap].append(seconds)
        if all(len(v) >= self.samples for v in self._measured.values()):
            inline_s, overlap_s = (statistics.median(self._measured[m]) for m in (False, True))
            self.chosen, self._step = overlap_s < inline_s, 0
            self.choices += 1
            log.info("structured-output masks: %s (median step %.2f ms overlapped, %.2f ms inline, %d steps "
                     "each); kept for %d constrained steps", "overlap" if self.chosen else "inline",
                     overlap_s * 1e3, inline_s * 1e3, self.samples, self.keep_steps)
