"""Structured output inside the engine: a regex or a choice is obeyed on `tiny` (greedy and seeded,
beside unconstrained rows whose tokens do not change), the grammar state survives a prefill → decode
handoff and a live migration (rebuilt from the output tokens), the grammar's end forces EOS even
before min_tokens, masks computed on the helper thread equal masks computed inline, and the real
model smollm2-135m writes JSON that follows the schema, greedily, through its chat template."""
from __future__ import annotations

import json
import re

import pytest
import torch

from services.engine.builder import build_engine
from services.engine.config import Role
from services.engine.loader import resolve_model
from services.engine.mask_mode import MaskModeChooser
from services.engine.request import FinishReason
from services.engine.sampling_params import SamplingParams, StructuredKind as K, StructuredOutput
from tests.conftest import random_prompts

VOCAB = 512
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
CHOICES = ("red", "green", 'blue "sky"')
CONSTRAINED = [
    SamplingParams(max_tokens=30, structured_output=StructuredOutput(K.REGEX, DATE)),
    SamplingParams(max_tokens=30, temperature=1.0, seed=7, structured_output=StructuredOutput(K.REGEX, DATE)),
    SamplingParams(max_tokens=30, temperature=1.0, seed=3, structured_output=StructuredOutput(K.CHOICE, choices=CHOICES)),
    SamplingParams(max_tokens=30, structured_output=StructuredOutput(K.CHOICE, choices=CHOICES)),
]
PLAIN = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


def engine(tiny, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("num_blocks", 256)
    return build_engine("tiny", loaded=tiny, dtype="float32", max_num_batched_tokens=128, **kw)


def finals(e) -> dict:
    out = {}
    while e.has_schedulable():
        for o in e.step():
            if o.finished:
                out[o.request_id] = o
    return out


def obeys(params: SamplingParams, text: str) -> bool:
    so = params.structured_output
    return re.fullmatch(DATE, text) is not None if so.kind == K.REGEX else text in CHOICES


@pytest.fixture(scope="module")
def alone(tiny):
    prompts = random_prompts([9, 30], VOCAB, seed=11)
    return prompts, {(i, j): engine(tiny).generate([p], sp)[0] for i, p in enumerate(prompts)
                     for j, sp in enumerate(CONSTRAINED + [PLAIN])}


def test_constraints_are_obeyed_beside_unconstrained_rows(tiny, alone):
    prompts, ref = alone
    for (i, j), out in ref.items():
        if j < len(CONSTRAINED):
            assert obeys(CONSTRAINED[j], out.text), (i, j, out.text)
            assert out.finish_reason == FinishReason.STOP and out.token_ids[-1] in tiny.config.eos_token_ids
    e = engine(tiny)
    ids = {e.add_request(prompts[i], sp): (i, j) for i in range(len(prompts))
           for j, sp in enumerate(CONSTRAINED + [PLAIN])}
    out = finals(e)
    for rid, key in ids.items():
        assert out[rid].token_ids == ref[key].token_ids, key          # whatever else is in the batch
    assert e.runner.grammar.num_states_held == 0
    e.check_integrity()


def test_unconstrained_text_breaks_the_constraint(tiny, alone):
    """The tiny random model left alone writes no date: the mask is what made the outputs above."""
    prompts, _ = alone
    out = engine(tiny).generate(prompts, SamplingParams(max_tokens=10))
    assert not any(re.fullmatch(DATE, o.text) for o in out)


def test_handoff_and_migration_rebuild_the_grammar_state(tiny, alone):
    prompts, ref = alone
    for j, sp in enumerate(CONSTRAINED[:2]):
        p, d = engine(tiny, role=Role.PREFILL), engine(tiny, role=Role.DECODE)
        rid = p.add_request(prompts[1], sp)
        first = finals(p)[rid].token_ids
        d.import_request(prompts[1], first, sp, p.export_kv(rid), rid)
        p.release(rid)
        assert len(first) == 1 and finals(d)[rid].token_ids == ref[(1, j)].token_ids, j

        a, b = engine(tiny), engine(tiny)
        rid = a.add_request(prompts[1], sp)
        while len(a.scheduler.requests[rid].output_token_ids) < 4:
            a.step()
        snap = a.pause(rid)
        table = b.reserve(rid, snap.num_computed_tokens)
        b.runner.kv[torch.tensor(table)] = a.runner.kv[torch.tensor(snap.block_table[:len(table)])]
        b.adopt(rid, snap.prompt_token_ids, snap.output_token_ids, snap.params, snap.priority, snap.output_logprobs)
        a.hand_off(rid)
        assert finals(b)[rid].token_ids == ref[(1, j)].token_ids, j
        for e in (p, d, a, b):
            e.check_integrity()
            assert e.kv.num_used_blocks == 0 and e.runner.grammar.num_states_held == 0


def test_the_grammar_end_forces_eos_before_min_tokens(tiny, alone):
    prompts, _ = alone
    sp = SamplingParams(max_tokens=30, min_tokens=25, structured_output=StructuredOutput(K.CHOICE, choices=("ok",)))
    out = engine(tiny).generate([prompts[0]], sp)[0]
    assert out.text == "ok" and out.finish_reason == FinishReason.STOP


@pytest.mark.parametrize("mode", ["inline", "overlap", "measured"])
def test_every_mask_mode_gives_the_same_tokens(tiny, alone, mode):
    """Inline, overlapped and measured (both, switching every 2 steps here) masks are the same masks."""
    prompts, ref = alone
    e = engine(tiny)
    masker = e.runner.grammar
    masker.mode, masker.chooser = mode, MaskModeChooser(run_steps=2, samples=1, keep_steps=2)
    out = e.generate([prompts[0]] * len(CONSTRAINED), CONSTRAINED)
    assert [o.token_ids for o in out] == [ref[(0, j)].token_ids for j in range(len(CONSTRAINED))]
    steps, overlapped = masker.stats.steps, masker.stats.overlapped_steps
    assert overlapped == {"inline": 0, "overlap": steps, "measured": overlapped}[mode]
    if mode == "measured":
        assert 0 < overlapped < steps and masker.chooser.choices >= 1


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                         "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}}}


@pytest.mark.slow          # the real 135M model (~12 s)
def test_smollm2_writes_json_that_follows_the_schema():
    from router.http_frontends import chat_template_for
    from services.engine.gguf_loader import load_gguf
    from tests.golden.smollm2_reference import smollm2_file

    path = smollm2_file()
    e = build_engine(path, dtype="float32", num_blocks=256, max_num_batched_tokens=256)
    template = chat_template_for(load_gguf(path, weights=False))
    questions = ["Describe a fictional person as JSON with name, age and hobbies.",
                 "Give me a JSON object for a cat named Tom who is 3 years old."]
    prompts = [e.tokenizer.encode(template.render([{"role": "user", "content": q}]), add_bos=template.add_bos)
               for q in questions]
    constrained = SamplingParams(max_tokens=100, structured_output=StructuredOutput(K.JSON_SCHEMA, json.dumps(PERSON)))
    outs = e.generate(prompts + prompts[:1], [constrained, constrained, SamplingParams(max_tokens=20)])
    for o in outs[:2]:
        value = json.loads(o.text)
        assert set(value) == {"name", "age", "hobbies"} and o.finish_reason == FinishReason.STOP, o.text
        assert isinstance(value["name"], str) and len(value["name"]) <= 24
        assert isinstance(value["age"], int) and value["age"] >= 0
        assert isinstance(value["hobbies"], list) and len(value["hobbies"]) <= 3
        assert all(isinstance(h, str) and len(h) <= 24 for h in value["hobbies"])
    assert not outs[2].text.startswith("{")          # unconstrained, the model starts with prose
    assert e.runner.grammar.num_states_held == 0
