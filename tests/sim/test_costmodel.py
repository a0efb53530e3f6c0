"""Cost model: fits recover planted coefficients; the closed-form decode run equals the sum of its steps."""
from __future__ import annotations

import random

import pytest

from tandem.sim.costmodel import CostModel, Profile, ProfileError, fit_decode, fit_prefill, fit_transfer, load_profile, save_profile


def test_prefill_fit_recovers_planted_coefficients():
    a, b, c = 0.012, 3.5e-4, 2.0e-8
    rng = random.Random(1)
    samples = []
    for _ in range(30):
        chunks = [(rng.randrange(8, 1500), 0) for _ in range(rng.randrange(1, 4))]
        samples.append((chunks, a + b * sum(l for l, _ in chunks) + c * sum(l * l for l, _ in chunks)))
    coef, err = fit_prefill(samples)
    assert coef == pytest.approx((a, b, c), rel=1e-6)
    assert err["mean_rel_error"] < 1e-9
    assert set(err["terms"]) == {"a_p", "b_p·Σl", "c_p·Σl²"}
    assert err["terms"]["c_p·Σl²"]["mean_rel_error_without"] > err["mean_rel_error"]


def test_decode_fit_recovers_planted_coefficients_under_noise():
    a, b, c = 0.02, 4e-7, 6e-4
    rng = random.Random(2)
    samples = []
    for _ in range(200):
        batch, ctx = rng.randrange(1, 64), rng.randrange(64, 2048)
        samples.append((batch, batch * ctx, (a + b * batch * ctx + c * batch) * (1 + rng.uniform(-0.01, 0.01))))
    coef, err = fit_decode(samples)
    assert coef == pytest.approx((a, b, c), rel=0.05)
    assert err["max_rel_error"] < 0.03


def test_transfer_fit():
    lat, bw = fit_transfer([(n, 0.001 + n / 2e9) for n in (1 << 16, 1 << 20, 1 << 24)])
    assert lat == pytest.approx(0.001, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)


def test_decode_run_is_the_sum_of_its_steps_and_steps_done_inverts_it():
    cost = CostModel(prefill=(0.01, 1e-4, 0.0), decode=(0.02, 1e-6, 5e-4))
    batch, ctx = 7, 3000
    total = sum(cost.decode_s(batch, ctx + j * batch) for j in range(50))
    assert cost.decode_run_s(50, batch, ctx) == pytest.approx(total, rel=1e-12)
    for j in (0, 1, 17, 50):
        t = cost.decode_run_s(j, batch, ctx)
        assert cost.decode_steps_done(t + 1e-9, batch, ctx, 50) == j
        if j:
            assert cost.decode_steps_done(t - 1e-6, batch, ctx, 50) == j - 1


def test_mixed_step_counts_one_intercept():
    cost = CostModel(prefill=(0.1, 0.01, 0.0), decode=(0.05, 0.0, 0.001))
    assert cost.step_s([(20, 0)], 2, 100) == pytest.approx(0.1 + 0.2 + 0.002)
    quad = CostModel(prefill=(0.1, 0.01, 1e-4), decode=(0.05, 0.0, 0.0))
    # a prompt's two chunks (the second after the first's 10 tokens) cost its attention once
    assert quad.prefill_s([(10, 0), (10, 10)]) == pytest.approx(quad.prefill_s([(20, 0)]))


def test_profile_round_trip_and_bad_files(tmp_path):
    prof = Profile(cost=CostModel(prefill=(1, 2, 3), decode=(4, 5, 6)), model="small", dtype="bfloat16")
    path = str(tmp_path / "p.json")
    save_profile(prof, path)
    assert load_profile(path) == prof
    with pytest.raises(ProfileError, match="--profile .*no such file"):
        load_profile(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"cost": {"prefill": [1, 2, 3], "decode": [1, 2, 3]}, "model": "m", '
                                       '"dtype": "float32", "num_blocks": 0}')
    with pytest.raises(ProfileError, match="num_blocks must be a positive integer"):
        load_profile(str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text('{"summary": {}}')
    with pytest.raises(ProfileError, match="not a Tandem profile"):
        load_profile(str(tmp_path / "other.json"))
