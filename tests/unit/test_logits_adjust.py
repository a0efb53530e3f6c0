"""Logit adjustments (penalties, logit_bias, min_tokens, min_p) against plain torch references."""
import math

import pytest
import torch

from services.engine.logits_adjust import LogitsAdjuster
from services.engine.request import Request, RequestStatus
from services.engine.sampler import Sampler
from services.engine.sampling_params import InvalidRequestError, SamplingParams

V = 50


def _request(rid, prompt, output, **kw) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=64, **kw), eos_token_ids=(2,),
                   output_token_ids=list(output))


def _reference(logits: torch.Tensor, r: Request) -> torch.Tensor:
    """One row, the textbook way: bias, min_tokens, repetition (prompt + output), frequency, presence."""
    p, x = r.sampling_params, logits.clone().float()
    for t, b in p.logit_bias:
        x[t] += b
    if len(r.output_token_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids)):
            x[t] = -math.inf
    seen = set(r.prompt_token_ids) | set(r.output_token_ids)
    for t in seen:
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(r.output_token_ids):
        x[t] -= p.frequency_penalty * r.output_token_ids.count(t) + p.presence_penalty
    return x


CASES = [dict(repetition_penalty=1.3), dict(repetition_penalty=0.7), dict(frequency_penalty=0.8),
         dict(presence_penalty=-1.5), dict(frequency_penalty=-0.4, presence_penalty=1.1, repetition_penalty=1.2),
         dict(logit_bias=((3, 5.0), (7, -100.0))), dict(min_tokens=5, stop_token_ids=(9,)),
         dict(min_tokens=5, ignore_eos=True, stop_token_ids=(9,))]


@pytest.mark.parametrize("kw", CASES)
def test_each_adjustment_equals_the_reference(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 4
    requests = [_request(f"r{i}", [1, 4, 4, 7], [5, 5, 8, 3][:i + 1], **kw) for i in range(3)]
    adj = LogitsAdjuster(V, torch.device("cpu"), initial_slots=1)   # grows: 3 rows, 1 slot
    step = adj.prepare(requests)
    assert step.rows == [0, 1, 2]
    x = logits.clone()
    step.apply(x)
    for i, r in enumerate(requests):
        torch.testing.assert_close(x[i], _reference(logits[i], r))


def test_counts_are_kept_incrementally_across_steps():
    """Tokens appended between steps are counted once; a request re-adopted from its token lists
    (a new Request object under the same id: migration, handoff) gets the same state."""
    adj = LogitsAdjuster(V, torch.device("cpu"))
    r = _request("a", [1, 2], [], frequency_penalty=0.5, repetition_penalty=1.5)
    logits = torch.randn(1, V)
    for token in [4, 4, 9, 4, 11]:
        x = logits.clone()
        adj.prepare([r]).apply(x)
        torch.testing.assert_close(x[0], _reference(logits[0], r))
        r.output_token_ids.append(token)
    assert adj._slots["a"].num_counted == 4
    moved = _request("a", [1, 2], r.output_token_ids, frequency_penalty=0.5, repetition_penalty=1.5)
    x, y = logits.clone(), logits.clone()
    adj.prepare([r]).apply(x)
    fresh = LogitsAdjuster(V, torch.device("cpu"))
    fresh.prepare([moved]).apply(y)
    torch.testing.assert_close(x, y)
    torch.testing.assert_close(y[0], _reference(logits[0], moved))


def test_plain_rows_are_not_adjusted_and_slots_are_reused():
    adj = LogitsAdjuster(V, torch.device("cpu"), initial_slots=2)
    plain = _request("p", [1], [3])
    done = _request("m", [1], [3, 4], min_tokens=2)           # min_tokens reached: plain again
    assert adj.prepare([plain, done]) is None
    a, b = _request("a", [1], [3], presence_penalty=1.0), _request("b", [1], [3], presence_penalty=1.0)
    adj.prepare([a, b]).apply(torch.zeros(2, V))
    a.status = RequestStatus.FINISHED
    c = _request("c", [1], [3], presence_penalty=1.0)
    adj.prepare([b, c]).apply(torch.zeros(2, V))
    assert adj.counts.shape[0] == 2 and set(adj._slots) == {"b", "c"}     # a's slot went to c
    adj.release("b")
    adj.release("b")                                                   # a second release is a no-op
    assert adj.num_slots_held == 1


def test_sampler_greedy_with_penalty_and_plain_rows_in_one_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    plain = _request("p", [1], [3])
    pen = _request("q", [1], [int(logits[1].argmax())], presence_penalty=2.0, repetition_penalty=2.0)
    bias = _request("b", [1], [3], logit_bias=((17, 100.0),))
    rnd = _request("s", [1], [3], temperature=1.0, seed=5, logit_bias=((23, 100.0),))
    requests = [plain, pen, bias, rnd]
    adj = LogitsAdjuster(V, torch.device("cpu"))
    out = Sampler()(logits, [r.sampling_params for r in requests], [1] * 4, adj.prepare(requests))
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == int(_reference(logits[1], pen).argmax())
    assert out.token_ids[2] == 17 and out.token_ids[3] == 23


def test_seeded_penalised_row_is_independent_of_batch():
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    r = _request("s", [1, 2], [4, 4, 6], temperature=0.8, seed=11, frequency_penalty=0.7, min_p=0.05)
    other = _request("o", [1], [3], temperature=1.0)
    alone = Sampler()(logits[1:2], [r.sampling_params], [3], LogitsAdjuster(V, torch.device("cpu")).prepare([r]))
    reqs = [other, r, _request("g", [1], [2])]
    mixed = Sampler()(logits, [q.sampling_params for q in reqs], [1, 3, 1], LogitsAdjuster(V, torch.device("cpu")).prepare(reqs))
    assert mixed.token_ids[1] == alone.token_ids[0]


def test_min_p_never_picks_below_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    p = SamplingParams(temperature=1.0, min_p=0.25)          # threshold 0.125: ids 0 and 1 only
    picks = {Sampler()(logits, [p], [i]).token_ids[0] for i in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("kw, field", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=17), "min_tokens"), (dict(logit_bias=((V, 1.0),)), "logit_bias"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias"), (dict(logit_bias=((1, 1.0), (1, 2.0))), "logit_bias"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty")])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_tokens=16, **kw).validate(V)
    assert e.value.field == field
