"""MaskModeChooser: alternates inline and overlap by runs, drops each run's first step, keeps the
mode with the lower median, re-measures after keep_steps."""
from __future__ import annotations

import pytest

from services.engine.mask_mode import MaskModeChooser


def drive(chooser: MaskModeChooser, cost: dict[bool, float], steps: int) -> list[bool]:
    """Run `steps` constrained steps where a mode's step takes cost[mode]; the modes used."""
    used = []
    for _ in range(steps):
        overlap = chooser.overlap()
        used.append(overlap)
        chooser.record(overlap, cost[overlap])
    return used


@pytest.mark.parametrize("faster", [False, True])
def test_measures_both_by_runs_then_keeps_the_faster(faster):
    c = MaskModeChooser(run_steps=3, samples=4, keep_steps=10)
    cost = {faster: 0.010, not faster: 0.012}
    used = drive(c, cost, 12)                      # 2 measured per run of 3: 2 runs of each mode
    assert used == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
    assert c.chosen is faster and c.choices == 1 and not c.measuring
    assert drive(c, cost, 10) == [faster] * 10     # kept for keep_steps...
    assert c.measuring                             # ...then measured again
    assert drive(c, cost, 3) == [False] * 3


def test_the_first_step_of_a_run_is_not_charged():
    """A slow first step after a switch (what the other mode left behind) does not decide."""
    c = MaskModeChooser(run_steps=2, samples=3, keep_steps=5)
    for _ in range(12):
        overlap = c.overlap()
        first = c._step % 2 == 0
        c.record(overlap, 1.0 if first else (0.010 if overlap else 0.011))
    assert c.chosen is True


def test_medians_resist_one_outlier():
    c = MaskModeChooser(run_steps=4, samples=6, keep_steps=5)
    times = iter([0.0, 0.010, 0.5, 0.010] * 2 + [0.0, 0.012, 0.012, 0.012] * 2)   # inline: one 0.5 s step
    for _ in range(16):
        overlap = c.overlap()
        c.record(overlap, next(times))
    assert c.chosen is False


@pytest.mark.parametrize("kwargs", [{"run_steps": 1}, {"samples": 0}, {"keep_steps": 0}])
def test_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        MaskModeChooser(**kwargs)
