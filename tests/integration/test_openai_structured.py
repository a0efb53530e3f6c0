"""Structured output through the official `openai` client on a real 1P+1D cluster: the prefill
instance samples the first token under the grammar, the decode instance rebuilds the grammar state
from it and goes on. response_format json_schema (chat, streamed too) gives JSON that follows the
schema; guided_regex / guided_choice are obeyed; the cluster's tokens equal an in-process engine
with the same constraint; bad schemas and grammars are 400s naming the field; nothing leaks."""
from __future__ import annotations

import json
import re

import openai
import pytest

from services.engine.builder import build_engine
from services.engine.sampling_params import SamplingParams, StructuredKind, StructuredOutput
from tests.conftest import random_prompts
from tests.integration.cluster_helpers import assert_no_leaks

pytestmark = pytest.mark.timeout(600)
PROMPTS = random_prompts([10, 33], 512, seed=8)
# A finite language: the tiny random model must end it within max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "size"],
          "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}}}
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


def follows(value) -> bool:
    return set(value) == {"ok", "size"} and isinstance(value["ok"], bool) and value["size"] in ("S", "M", "L")


def test_chat_response_format_json_schema(client, name, openai_cluster):
    fmt = {"type": "json_schema", "json_schema": {"name": "shirt", "schema": SCHEMA, "strict": True}}
    for content in ("Is it ok? What size?", "Describe a shirt."):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}],
                                           temperature=0, max_tokens=60, response_format=fmt)
        assert r.choices[0].finish_reason == "stop" and follows(json.loads(r.choices[0].message.content))
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Stream it."}],
                                            temperature=0.8, seed=5, max_tokens=60, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert follows(json.loads(text))
    assert_no_leaks(openai_cluster.address)


def test_guided_regex_and_choice_equal_the_engine(client, name, chat_model_dir, openai_cluster):
    engine = build_engine(chat_model_dir, dtype="float32", num_blocks=64, block_size=16)
    cases = [({"guided_regex": DATE}, StructuredOutput(StructuredKind.REGEX, DATE)),
             ({"guided_choice": ["alpha", "beta", "gamma"]},
              StructuredOutput(StructuredKind.CHOICE, choices=("alpha", "beta", "gamma"))),
             ({"guided_json": SCHEMA}, StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA, indent=1)))]
    for extra, so in cases:
        ref = engine.generate(PROMPTS, SamplingParams(max_tokens=40, structured_output=so))
        for prompt, want in zip(PROMPTS, ref):
            r = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=40,
                                          extra_body={"return_token_ids": True, **extra})
            choice = r.choices[0]
            assert choice.model_extra["token_ids"] == want.token_ids and choice.text == want.text, extra
            assert choice.finish_reason == "stop"
            if "guided_regex" in extra:
                assert re.fullmatch(DATE, choice.text)
            elif "guided_choice" in extra:
                assert choice.text in extra["guided_choice"]
            else:
                assert follows(json.loads(choice.text))
    assert_no_leaks(openai_cluster.address)


@pytest.mark.parametrize("kw, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "minItems": 3, "maxItems": 1}}}}, "response_format.json_schema.schema", "Unsatisfiable"),
    ({"extra_body": {"guided_grammar": 'start: foo\nfoo: foo "a"'}}, "guided_grammar", "accepts no output"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex", "invalid regex"),
    ({"extra_body": {"guided_choice": "yes"}}, "guided_choice", "list"),
])
def test_bad_constraints_are_400s_naming_the_field(client, name, openai_cluster, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=5, **kw)
    error = e.value.body
    assert error["param"] == param and words in error["message"], error
    assert "<state>" not in error["message"]
    assert_no_leaks(openai_cluster.address)
