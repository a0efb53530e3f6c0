import math

import pytest
import torch

from services.engine.sampler import Sampler, SamplerOutput, noise_seed, seed_shared_generators
from services.engine.sampling_params import SamplingParams

torch.set_num_threads(1)

V = 64
GREEDY = SamplingParams()


def make_logits(batch, vocab=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


@pytest.fixture(autouse=True)
def _fixed_shared_seed():
    seed_shared_generators(1234)


def test_greedy_equals_argmax_and_logprobs_match_log_softmax():
    logits = make_logits(5)
    out = Sampler()(logits, [SamplingParams(logprobs=0)] * 5, [0] * 5)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, t].item(), abs=1e-5)
    assert out.top_logprobs == [None] * 5


def test_half_precision_logits_are_handled_in_float32():
    logits = make_logits(3).to(torch.bfloat16)
    out = Sampler()(logits, [SamplingParams(logprobs=0)] * 3, [0] * 3)
    ref = torch.log_softmax(logits.float(), -1)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, t].item(), abs=1e-5)


def test_logprobs_are_nan_unless_asked():
    logits = make_logits(3)
    out = Sampler()(logits, [GREEDY, SamplingParams(logprobs=0), GREEDY], [0] * 3)
    assert math.isnan(out.logprobs[0]) and math.isnan(out.logprobs[2])
    assert out.logprobs[1] == pytest.approx(torch.log_softmax(logits[1], -1)[out.token_ids[1]].item(), abs=1e-5)


def test_logprob_of_sampled_token_is_raw_distribution():
    logits = make_logits(4, seed=3)
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=i, logprobs=0) for i in range(4)]
    out = Sampler()(logits, params, [0] * 4)
    ref = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, t].item(), abs=1e-5)


def test_top_logprobs_sorted_and_correct():
    logits = make_logits(3, seed=1)
    params = [SamplingParams(logprobs=4), SamplingParams(), SamplingParams(logprobs=0, temperature=1.0, seed=1)]
    out = Sampler()(logits, params, [0, 0, 0])
    assert out.top_logprobs[1] is None and out.top_logprobs[2] is None
    top = out.top_logprobs[0]
    assert len(top) == 4
    ref = torch.log_softmax(logits[0], -1)
    vals, ids = ref.topk(4)
    assert [t for t, _ in top] == ids.tolist()
    assert [lp for _, lp in top] == pytest.approx(vals.tolist(), abs=1e-6)
    assert all(top[i][1] >= top[i + 1][1] for i in range(3))
    assert top[0][0] == out.token_ids[0]  # greedy row: chosen token is the top-1


def test_top_k_one_equals_greedy_at_high_temperature():
    logits = make_logits(8, seed=2)
    params = [SamplingParams(temperature=50.0, top_k=1)] * 4 + \
             [SamplingParams(temperature=50.0, top_k=1, seed=i) for i in range(4)]
    for step in range(5):
        out = Sampler()(logits, params, [step] * 8)
        assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    logits = make_logits(6, seed=4)
    params = [SamplingParams(temperature=5.0, top_p=1e-6)] * 3 + \
             [SamplingParams(temperature=5.0, top_p=1e-6, seed=7)] * 3
    for step in range(5):
        assert Sampler()(logits, params, [step] * 6).token_ids == logits.argmax(-1).tolist()


def test_seeded_row_is_independent_of_batch_composition():
    sampler = Sampler()
    target_logits = make_logits(1, seed=10, scale=1.0)[0]  # flat-ish: many plausible tokens
    target = SamplingParams(temperature=1.0, seed=42, top_p=0.95)
    others = make_logits(7, seed=11)
    other_params = [GREEDY, SamplingParams(temperature=0.8), SamplingParams(temperature=1.2, seed=5, top_k=10),
                    SamplingParams(temperature=1.0, logprobs=3), GREEDY, SamplingParams(temperature=2.0, seed=42),
                    SamplingParams(temperature=0.5, top_p=0.5)]

    def run(step, position, n_neighbours):
        rows = list(others[:n_neighbours])
        params = list(other_params[:n_neighbours])
        idx = [0] * n_neighbours
        rows.insert(position, target_logits)
        params.insert(position, target)
        idx.insert(position, step)
        return sampler(torch.stack(rows), params, idx).token_ids[position]

    for step in range(6):
        expected = run(step, 0, 0)
        for position, n in [(0, 3), (2, 3), (7, 7), (4, 7), (1, 1)]:
            assert run(step, position, n) == expected


def test_different_output_index_gives_different_draws():
    logits = torch.zeros(1, 1000)  # uniform: every token equally likely
    params = [SamplingParams(temperature=1.0, seed=99)]
    tokens = [Sampler()(logits, params, [i]).token_ids[0] for i in range(20)]
    assert len(set(tokens)) >= 15
    again = [Sampler()(logits, params, [i]).token_ids[0] for i in range(20)]
    assert tokens == again
    other_seed = [Sampler()(logits, [SamplingParams(temperature=1.0, seed=100)], [i]).token_ids[0]
                  for i in range(20)]
    assert other_seed != tokens
    assert noise_seed(99, 0) != noise_seed(99, 1) and 0 <= noise_seed(-5, 3) < 2**63


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_unseeded_distribution_matches_softmax(temperature):
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    params = [SamplingParams(temperature=temperature)] * n
    out = Sampler()(row.expand(n, -1), params, [0] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=row.numel()).double() / n
    expected = torch.softmax(row.double() / temperature, -1)
    for c, e in zip(counts.tolist(), expected.tolist()):
        assert abs(c - e) < 4 * math.sqrt(e * (1 - e) / n) + 1e-3


def test_seeded_rows_follow_the_distribution_too():
    row = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
    out = Sampler()(row.expand(n, -1), params, [0] * n)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    expected = torch.softmax(row.double(), -1)
    for c, e in zip(counts.tolist(), expected.tolist()):
        assert abs(c - e) < 4 * math.sqrt(e * (1 - e) / n) + 1e-3


def test_top_k_and_top_p_never_pick_filtered_tokens():
    row = torch.tensor([3.0, 2.9, 2.0, 1.0, 0.5, 0.5, 0.0, -1.0])
    n = 5000
    probs = torch.softmax(row / 2.0, -1)
    # top_k=3 with ties at the boundary elsewhere; expect ids {0, 1, 2}
    out = Sampler()(row.expand(n, -1), [SamplingParams(temperature=2.0, top_k=3)] * n, [0] * n)
    assert set(out.token_ids) == {0, 1, 2}
    # top_p: smallest prefix with cumulative prob >= p
    p = float(probs[:3].sum() - 1e-3)   # needs the first 3 tokens
    out = Sampler()(row.expand(n, -1), [SamplingParams(temperature=2.0, top_p=p)] * n, [0] * n)
    assert set(out.token_ids) == {0, 1, 2}
    # both: top_k=5 then top_p over the renormalised 5
    probs5 = torch.softmax(row[:5] / 2.0, -1)
    p = float(probs5[:2].sum() + 1e-3)  # needs 3 of the 5
    out = Sampler()(row.expand(n, -1), [SamplingParams(temperature=2.0, top_k=5, top_p=p, seed=None)] * n,
                    [0] * n)
    assert set(out.token_ids) == {0, 1, 2}
    # ties at the top-k boundary: exactly k tokens, lower id first (like argmax)
    tie = torch.tensor([1.0, 1.0, 1.0, 1.0, -5.0])
    out = Sampler()(tie.expand(n, -1), [SamplingParams(temperature=1.0, top_k=2)] * n, [0] * n)
    assert set(out.token_ids) == {0, 1}


def test_mixed_batch_and_masked_vocab():
    logits = make_logits(4, seed=8)
    logits[:, 10:] = float("-inf")  # padded vocabulary entries
    params = [SamplingParams(logprobs=0), SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=1.0, seed=3, top_p=0.9, logprobs=1),
              SamplingParams(temperature=0.9, top_k=4, logprobs=2)]
    for step in range(10):
        out = Sampler()(logits, params, [step] * 4)
        assert all(t < 10 for t in out.token_ids)
        assert all(math.isfinite(lp) for lp in out.logprobs)
        assert out.token_ids[0] == logits[0].argmax().item()
        assert len(out.top_logprobs[3]) == 2


def test_empty_batch_and_shape_errors():
    out = Sampler()(torch.zeros(0, V), [], [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(V), [GREEDY], [0])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, V), [GREEDY], [0])


@pytest.mark.parametrize("rows,vocab", [(1, 32000), (2, 1024), (8, 32000), (5, 32003), (3, 700), (33, 1500)])
def test_greedy_argmax_is_torch_argmax_ties_and_nan_included(rows, vocab):
    from services.engine.sampler import greedy_argmax

    g = torch.Generator().manual_seed(rows * vocab)
    x = (torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16)
    x[0, vocab // 3] = x[0, vocab - 1] = 40.0               # a tie: the first index wins
    if rows > 1:
        x[1, :] = float("-inf")                           # all -inf: index 0
        x[-1, vocab // 2] = float("nan")                  # NaN counts as the maximum
        x[-1, vocab - 2] = float("nan")
    if rows > 2:
        x[2, vocab - 1] = float("inf")                    # in the tail past the last whole chunk
    assert torch.equal(greedy_argmax(x), x.float().argmax(dim=-1))
    assert torch.equal(greedy_argmax(x.float()), x.float().argmax(dim=-1))
