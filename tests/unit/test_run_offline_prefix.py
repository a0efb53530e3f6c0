"""`tandem run` groups prompts by shared prefix (BatchLLM): exact groups, the same tokens as input
order, each shared prefix computed once, output in input order."""
from __future__ import annotations

import io
import json
import random

import pytest

from services.engine.builder import build_engine
from services.engine.sampling_params import SamplingParams
from tandem.run_offline import InputError, PromptLine, plan_prefix_groups, run_offline

BS = 16


def test_groups_share_a_full_block_with_their_leader():
    a, b = [1] * 16, [2] * 16
    prompts = [b + [5], a + [9, 9], [3, 4], a + [1], b + [0], a[:15] + [7] * 3, [3, 4]]
    groups = plan_prefix_groups(prompts, BS)
    assert [(g.leader, g.followers) for g in groups] == [
        (3, (1,)),             # a + [1] < a + [9, 9] (sorted by tokens)
        (5, ()),               # a[:15] + 7s: 15 tokens shared with a + [1]: not a full block
        (4, (0,)),             # b + [0] < b + [5]
        (2, ()), (6, ())]      # short prompts share no full block, even equal ones
    assert sorted(i for g in groups for i in (g.leader, *g.followers)) == list(range(len(prompts)))


@pytest.fixture(scope="module")
def engine_factory():
    def make(num_blocks=None):
        return build_engine("tiny", dtype="float32", num_blocks=num_blocks or 256, max_num_batched_tokens=256,
                            max_num_seqs=16)
    return make


def shared_prefix_batch(seed=0, apps=4, per_app=6, prefix=64, tail=(3, 20)):
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 500) for _ in range(prefix)] for _ in range(apps)]
    lines = [PromptLine(None, systems[rng.randrange(apps)] + [rng.randrange(3, 500) for _ in range(rng.randint(*tail))],
                        rng.choice([None, 4, 9])) for _ in range(apps * per_app)]
    return lines


def run(engine, lines, order):
    out = io.StringIO()
    stats = run_offline(engine, lines, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), out, order=order)
    engine.check_integrity()
    return [json.loads(line) for line in out.getvalue().splitlines()], stats


def test_prefix_order_gives_the_same_output_in_input_order_and_computes_each_prefix_once(engine_factory):
    lines = shared_prefix_batch()
    by_input, s_input = run(engine_factory(), lines, "input")
    by_prefix, s_prefix = run(engine_factory(), lines, "prefix")
    assert by_prefix == by_input
    assert [len(r["token_ids"]) for r in by_prefix] == [ln.max_tokens or 6 for ln in lines]
    # Each system prompt (4 blocks) is computed once; every other request reuses it.
    systems = {tuple(ln.token_ids[:64]) for ln in lines}
    assert s_prefix["cached_prompt_tokens"] == (len(lines) - len(systems)) * 64
    assert s_prefix["cached_prompt_tokens"] >= s_input["cached_prompt_tokens"]
    assert s_prefix["order"] == "prefix" and s_input["order"] == "input"


def test_prefix_order_under_a_small_cache_still_matches(engine_factory):
    lines = shared_prefix_batch(seed=1, apps=6, per_app=4)
    by_input, _ = run(engine_factory(num_blocks=24), lines, "input")
    by_prefix, _ = run(engine_factory(num_blocks=24), lines, "prefix")
    assert by_prefix == by_input


def test_unknown_order_is_a_clear_error(engine_factory):
    with pytest.raises(InputError, match="order 'random': use one of prefix, input"):
        run(engine_factory(), shared_prefix_batch(), "random")
