"""LLMEngine on the `tiny` model: preemption, aborts, seeded sampling, stops, logprobs, prefix caching,
input validation."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from services.engine.builder import build_engine
from services.engine.loader import resolve_model
from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.conftest import random_prompts

VOCAB = 512
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=0)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


@pytest.fixture
def make(tiny):
    """make(**build_engine kwargs) → engine on the shared tiny weights; integrity-checked at teardown."""
    engines = []

    def _make(**kw):
        kw.setdefault("block_size", 8)
        kw.setdefault("num_blocks", 256)
        kw.setdefault("max_num_batched_tokens", 64)
        kw.setdefault("dtype", "float32")       # exact comparisons between runs (auto may pick bf16)
        e = build_engine("tiny", loaded=tiny, **kw)
        engines.append(e)
        return e

    yield _make
    for e in engines:
        e.check_integrity()


def run_steps(engine) -> dict[str, list]:
    """Drive engine.step() to completion; every RequestOutput per request id, in order."""
    seen: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(o)
        engine.check_integrity()
    return seen


# ---------------------------------------------------------------- preemption
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("prefix", [True, False], ids=["prefix", "noprefix"])
def test_preemption_then_recompute_matches_unconstrained_run(make, params, prefix):
    prompts = random_prompts([40, 37, 45, 30, 42, 38], VOCAB, seed=11)
    params = replace(params, max_tokens=40, logprobs=0)
    reference = make(num_blocks=400, enable_prefix_caching=prefix).generate(prompts, params)

    engine = make(num_blocks=22, enable_prefix_caching=prefix)   # ~2 requests of 80+ tokens fit at once
    preempted = []
    original = engine.scheduler._preempt

    def spy(request, out):
        preempted.append(request.request_id)
        original(request, out)

    engine.scheduler._preempt = spy
    outs = engine.generate(prompts, params)
    assert preempted, "the small cache should have forced at least one preemption"
    for ref, out in zip(reference, outs):
        assert out.token_ids == ref.token_ids
        assert out.finish_reason == FinishReason.LENGTH and len(out.token_ids) == 40
        assert out.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert engine.kv.num_used_blocks == 0 and not engine.has_unfinished()


# ---------------------------------------------------------------- aborts
def test_abort_mid_prefill_frees_every_block(make):
    engine = make(max_num_batched_tokens=16)
    rid = engine.add_request(random_prompts([100], VOCAB)[0], GREEDY)
    other = engine.add_request(random_prompts([30], VOCAB, seed=3)[0], GREEDY)
    assert engine.step() == []                         # one 16-token chunk, nothing sampled
    request = engine.scheduler.requests[rid]
    assert 0 < request.num_computed_tokens < request.num_prompt_tokens
    assert engine.kv.num_used_blocks > 0
    out = engine.abort_request(rid)
    assert out.finished and out.finish_reason == FinishReason.ABORT and out.token_ids == []
    assert engine.abort_request(other).finish_reason == FinishReason.ABORT   # never scheduled
    assert engine.kv.num_used_blocks == 0 and not engine.has_unfinished()
    engine.check_integrity()
    assert engine.abort_request(rid) is None and engine.abort_request("nope") is None


def test_abort_mid_decode_frees_every_block(make):
    engine = make()
    keep = engine.add_request(random_prompts([20], VOCAB, seed=4)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    rid = engine.add_request(random_prompts([50], VOCAB, seed=5)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    while len(engine.scheduler.requests[rid].output_token_ids) < 3:
        engine.step()
    out = engine.abort_request(rid)
    assert out.finish_reason == FinishReason.ABORT and len(out.token_ids) == 3
    engine.check_integrity()
    assert engine.kv.num_used_blocks == len(engine.kv.block_table(keep))
    engine.abort_request(keep)
    assert engine.kv.num_used_blocks == 0
    engine.check_integrity()
    assert engine.step() == [] and not engine.has_unfinished()


# ---------------------------------------------------------------- seeded sampling
def test_seeded_sampling_is_independent_of_the_batch(make):
    target = random_prompts([33], VOCAB, seed=21)[0]
    alone = make().generate([target], SEEDED)[0].token_ids
    greedy = make().generate([target], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    assert alone != greedy, "temperature 0.8 should actually sample"

    others = random_prompts([20, 7, 50, 12, 41, 25, 3], VOCAB, seed=22)
    other_params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=15) if i % 3 == 0 else
                    SamplingParams(temperature=0.7, top_k=20, max_tokens=25) if i % 3 == 1 else
                    SamplingParams(max_tokens=10) for i in range(7)]
    for pos in (0, 5, 7):
        prompts = others[:pos] + [target] + others[pos:]
        params = other_params[:pos] + [SEEDED] + other_params[pos:]
        outs = make(max_num_batched_tokens=48).generate(prompts, params)
        assert outs[pos].token_ids == alone, f"position {pos}"


def test_different_seeds_give_different_outputs(make):
    target = random_prompts([33], VOCAB, seed=21)[0]
    engine = make()
    outs = engine.generate([target] * 3, [SEEDED, replace(SEEDED, seed=8), SEEDED])
    assert outs[0].token_ids == outs[2].token_ids
    assert outs[0].token_ids != outs[1].token_ids


# ---------------------------------------------------------------- stop strings
def _stop_cases(text: str) -> list[str]:
    """Two stop strings from the middle of `text`: one whole filler token, one across a token boundary."""
    mid = len(text) // 3
    start = text.index("<extra_", mid)
    whole = text[start:text.index(">", start) + 1]
    boundary = text.index("><extra_", mid)
    return [whole, text[boundary - 2:boundary + 5]]


def test_stop_strings_cut_text_right_before_the_match(make):
    engine = make()
    prompt = engine.tokenizer.encode("Hello world, this is a test")
    full = engine.generate([prompt], SamplingParams(max_tokens=40))[0]
    assert len(full.text) > 40
    for stop in _stop_cases(full.text):
        expected = full.text[:full.text.index(stop)]
        assert 0 < len(expected) < len(full.text)
        engine.add_request(prompt, SamplingParams(max_tokens=40, stop=(stop,)), request_id="s")
        outs = run_steps(engine)["s"]
        final = outs[-1]
        assert final.finished and final.finish_reason == FinishReason.STOP
        assert final.text == expected
        assert "".join(o.new_text for o in outs) == expected         # deltas never leak the stop
        assert len(final.token_ids) < len(full.token_ids)
        assert final.token_ids == full.token_ids[:len(final.token_ids)]
        assert engine.kv.num_used_blocks == 0


def test_stop_string_on_the_last_allowed_token_reports_stop(make):
    engine = make()
    tok = engine.tokenizer
    prompt = tok.encode("Hello world, this is a test")
    full = engine.generate([prompt], SamplingParams(max_tokens=40))[0]
    # a filler token in the middle whose text does not occur earlier in the output
    k = next(i for i in range(len(full.token_ids) // 3, len(full.token_ids))
             if full.token_ids[i] >= 259 and tok.decode([full.token_ids[i]]) not in tok.decode(full.token_ids[:i]))
    stop = tok.decode([full.token_ids[k]])
    expected = tok.decode(full.token_ids[:k])
    # one token of slack: the stop string ends the request
    slack = engine.generate([prompt], SamplingParams(max_tokens=k + 2, stop=(stop,)))[0]
    assert slack.text == expected and slack.finish_reason == FinishReason.STOP and len(slack.token_ids) == k + 1
    # the stop string completes on the very last allowed token: same text, so the same reason
    exact = engine.generate([prompt], SamplingParams(max_tokens=k + 1, stop=(stop,)))[0]
    assert exact.text == expected and len(exact.token_ids) == k + 1
    assert exact.finish_reason == FinishReason.STOP


# ---------------------------------------------------------------- logprobs
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=8, logprobs=3),
                                    SamplingParams(max_tokens=8, logprobs=3, temperature=1.5, seed=3)],
                         ids=["greedy", "sampled"])
def test_top_logprobs(make, params):
    out = make().generate(random_prompts([17], VOCAB, seed=9), params)[0]
    assert len(out.token_ids) == len(out.logprobs) == len(out.top_logprobs) == 8
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 3
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert len({t for t, _ in top}) == 3 and all(0 <= t < VOCAB for t, _ in top)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
        assert lp <= values[0] + 1e-6
        if params.greedy:
            assert top[0][0] == tok
        for t, v in top:
            if t == tok:
                assert lp == pytest.approx(v, abs=1e-5)


def test_logprobs_none_and_zero(make):
    engine = make()
    prompt = random_prompts([17], VOCAB, seed=9)[0]
    none, zero = engine.generate([prompt, prompt], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, logprobs=0)])
    assert none.token_ids == zero.token_ids
    assert none.top_logprobs == [] and zero.top_logprobs == []
    assert len(zero.logprobs) == 4 and all(lp <= 0 for lp in zero.logprobs)
    assert all(math.isnan(lp) for lp in none.logprobs)          # not computed unless asked


def test_step_outputs_are_snapshots(make):
    engine = make()
    engine.add_request(random_prompts([10], VOCAB)[0], SamplingParams(max_tokens=5, logprobs=2), request_id="r")
    outs = run_steps(engine)["r"]
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids)
        assert len(o.top_logprobs) == len(o.token_ids)


# ---------------------------------------------------------------- eos / max_tokens
def test_ignore_eos_gives_exactly_max_tokens(make):
    engine = make()
    prompt = engine.tokenizer.encode("Hello world, this is a test")
    eos = engine.config.model.eos_token_ids[0]
    natural = engine.generate([prompt], SamplingParams(max_tokens=40))[0]
    assert natural.finish_reason == FinishReason.STOP and natural.token_ids[-1] == eos
    forced = engine.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert len(forced.token_ids) == 40 and forced.finish_reason == FinishReason.LENGTH
    assert eos in forced.token_ids
    assert forced.token_ids[:len(natural.token_ids)] == natural.token_ids


# ---------------------------------------------------------------- prefix caching
def test_same_prompt_twice_hits_the_prefix_cache(make):
    engine = make()
    prompt = random_prompts([40], VOCAB, seed=13)[0]
    first = engine.generate([prompt], GREEDY)[0]
    second = engine.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32          # 4 full blocks of 8; the 5th would leave nothing to compute
    assert second.token_ids == first.token_ids
    assert second.logprobs == pytest.approx(first.logprobs, abs=1e-4)


def test_prefix_caching_on_and_off_give_the_same_tokens(make):
    shared = random_prompts([24], VOCAB, seed=14)[0]
    prompts = [shared + tail for tail in random_prompts([5, 17, 1, 30, 9, 12], VOCAB, seed=15)]
    on = make(max_num_batched_tokens=32).generate(prompts, GREEDY)
    off = make(max_num_batched_tokens=32, enable_prefix_caching=False).generate(prompts, GREEDY)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert any(o.num_cached_tokens > 0 for o in on)
    assert all(o.num_cached_tokens == 0 for o in off)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("prompt,params,field", [
    ([], SamplingParams(), "prompt"),
    ([5] * 64, SamplingParams(max_tokens=1), "prompt"),           # context is 64: no room for output
    ([5] * 100, SamplingParams(), "prompt"),
    ([5], SamplingParams(max_tokens=0), "max_tokens"),
    ([5], SamplingParams(max_tokens=-3), "max_tokens"),
    ([5], SamplingParams(temperature=-0.1), "temperature"),
    ([5], SamplingParams(top_p=0.0), "top_p"),
    ([5], SamplingParams(top_p=1.5), "top_p"),
    ([5], SamplingParams(top_k=-1), "top_k"),
    ([5, -1], SamplingParams(), "token_ids"),
    ([5, VOCAB], SamplingParams(), "token_ids"),
    ([5], SamplingParams(stop_token_ids=(VOCAB,)), "stop_token_ids"),
    ([5], SamplingParams(logprobs=21), "logprobs"),
    ([5], SamplingParams(stop=("",)), "stop"),
])
def test_bad_input_names_the_field(make, prompt, params, field):
    engine = make(max_model_len=64)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(prompt, params)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")
    assert not engine.has_unfinished()


def test_longest_valid_prompt_is_accepted(make):
    engine = make(max_model_len=64)
    out = engine.generate([[5] * 63], SamplingParams(max_tokens=16))[0]
    assert len(out.token_ids) == 1 and out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


def test_request_larger_than_the_whole_cache_is_rejected(make):
    engine = make(num_blocks=4, block_size=8)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request([5] * 20, SamplingParams(max_tokens=20))
    assert e.value.field == "max_tokens"
    engine.add_request([5] * 20, SamplingParams(max_tokens=12))      # exactly 4 blocks: accepted


def test_duplicate_request_id(make):
    engine = make()
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), request_id="dup")
    with pytest.raises(ValueError, match="dup") as e:
        engine.add_request([8, 9], SamplingParams(max_tokens=3), request_id="dup")
    assert not isinstance(e.value, InvalidRequestError)
    out = run_steps(engine)["dup"][-1]                 # the first request is untouched
    assert len(out.token_ids) == 3 and out.num_prompt_tokens == 3
    engine.add_request([8, 9], SamplingParams(max_tokens=3), request_id="dup")   # finished ids are reusable
    run_steps(engine)


def test_detokenize_false_gives_same_tokens_and_no_text(make):
    engine = make()
    prompts = random_prompts([5, 30], 512, seed=11)
    with_text = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    ids_only = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, detokenize=False))
    for a, b in zip(with_text, ids_only):
        assert a.token_ids == b.token_ids and a.text != "" and b.text == ""
    with pytest.raises(InvalidRequestError) as e:
        engine.validate([5, 6], SamplingParams(stop=("x",), detokenize=False))
    assert e.value.field == "stop"


def test_step_outputs_are_deltas_that_add_up_to_the_final_output(make):
    engine = make()
    rid = engine.add_request(random_prompts([9], 512, seed=12)[0],
                             SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0))
    steps = []
    while engine.has_unfinished():
        steps += [o for o in engine.step() if o.request_id == rid]
    final = steps[-1]
    assert final.finished and all(not o.finished and o.token_ids == [] for o in steps[:-1])
    assert [t for o in steps for t in o.new_token_ids] == final.token_ids
    assert [lp for o in steps for lp in o.new_logprobs] == final.logprobs
    assert "".join(o.new_text for o in steps) == final.text
