"""Structured-output specs: shape checks, compile checks (invalid or unsatisfiable → an error naming
the field, without the parser's internals), the OpenAI fields that carry them and the wire form."""
from __future__ import annotations

import json

import pytest

from router.openai_api.chat_template import ChatTemplate
from router.openai_api.errors import ApiError, from_invalid_request
from router.openai_api.requests import parse_chat, parse_completion
from router.request.validation import build_request
from services.engine.grammar import check_structured, grammar_of
from services.engine.sampling_params import InvalidRequestError, SamplingParams, StructuredKind as K, StructuredOutput
from services.proto_convert import sampling_params_from_proto, sampling_params_to_proto
from tandem.v1 import serving_pb2

CHAT = [{"role": "user", "content": "x"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}



def refused_spec(so: StructuredOutput, tok=None) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        check_structured(so, tok)
    assert e.value.field == "structured_output"
    assert "<state>" not in str(e.value) and len(str(e.value)) < 400     # no parser dump leaks out
    return e.value


@pytest.mark.parametrize("so, words", [
    (StructuredOutput(K.JSON_SCHEMA, "{not json"), "not valid JSON"),
    (StructuredOutput(K.JSON_SCHEMA, "[1, 2]"), "must be an object"),
    (StructuredOutput(K.JSON_SCHEMA, json.dumps({"type": "foo"})), "Invalid type"),
    (StructuredOutput(K.JSON_SCHEMA, json.dumps({"type": "string", "minLength": 5, "maxLength": 2})), "Unsatisfiable"),
    (StructuredOutput(K.JSON_SCHEMA, json.dumps({"allOf": [{"type": "string"}, {"type": "integer"}]})),
     "Unsatisfiable"),
    (StructuredOutput(K.REGEX, "[a-z"), "invalid regex"),
    (StructuredOutput(K.GRAMMAR, "start: missing_rule"), "invalid grammar"),
    (StructuredOutput(K.CHOICE), "non-empty list"),
    (StructuredOutput(K.CHOICE, choices=("a", "")), "non-empty list"),
    (StructuredOutput(K.REGEX), "non-empty spec"),
    (StructuredOutput(K.JSON_OBJECT, "x"), "no spec"),
])
def test_bad_specs_are_refused_naming_the_field(so, words):
    assert words in str(refused_spec(so))


def test_an_empty_language_is_found_with_the_tokenizer(tok):
    so = StructuredOutput(K.GRAMMAR, 'start: foo\nfoo: foo "a"')       # no finite string derives
    check_structured(so)                                               # compiles
    assert "accepts no output" in str(refused_spec(so, tok))


def test_good_specs_compile_once(tok):
    for so in (StructuredOutput(K.JSON_OBJECT), StructuredOutput(K.JSON_SCHEMA, json.dumps(SCHEMA)),
               StructuredOutput(K.REGEX, r"\d+"), StructuredOutput(K.CHOICE, choices=('say "hi"', "a\\b")),
               StructuredOutput(K.GRAMMAR, 'start: "x" start | "y"')):
        check_structured(so, tok)
        assert grammar_of(so) is grammar_of(so)


def test_ignore_eos_is_refused_with_a_constraint():
    sp = SamplingParams(ignore_eos=True, structured_output=StructuredOutput(K.JSON_OBJECT))
    with pytest.raises(InvalidRequestError) as e:
        sp.validate(512)
    assert e.value.field == "ignore_eos"


def test_the_wire_form_round_trips():
    for so in (StructuredOutput(K.JSON_SCHEMA, json.dumps(SCHEMA)), StructuredOutput(K.CHOICE, choices=("a", "b"))):
        sp = SamplingParams(max_tokens=5, structured_output=so)
        assert sampling_params_from_proto(sampling_params_to_proto(sp)) == sp
    assert sampling_params_from_proto(serving_pb2.SamplingParams(max_tokens=5)).structured_output is None


# ---- the OpenAI fields ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra, kind, spec, choices", [
    ({"response_format": {"type": "json_object"}}, K.JSON_OBJECT, "", []),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     K.JSON_SCHEMA, json.dumps(SCHEMA), []),
    ({"guided_json": SCHEMA}, K.JSON_SCHEMA, json.dumps(SCHEMA), []),
    ({"guided_json": json.dumps(SCHEMA)}, K.JSON_SCHEMA, json.dumps(SCHEMA), []),
    ({"guided_regex": "[0-9]+"}, K.REGEX, "[0-9]+", []),
    ({"guided_choice": ["yes", "no"]}, K.CHOICE, "", ["yes", "no"]),
    ({"guided_grammar": 'start: "a"'}, K.GRAMMAR, 'start: "a"', []),
    ({"structured_outputs": {"regex": "a+"}}, K.REGEX, "a+", []),
    ({"regex": "b+"}, K.REGEX, "b+", []),
])
def test_each_openai_form_lands_in_the_params(model, tok, extra, kind, spec, choices):
    for parse, body in ((parse_completion, {"prompt": "a", **extra}),
                        (lambda b, m, t: parse_chat(b, m, t, ChatTemplate.default()), {"messages": CHAT, **extra})):
        so = parse(body, model, tok).request.params.structured_output
        assert (so.kind, so.spec, list(so.choices)) == (kind, spec, choices)


def test_gbnf_grammars_become_lark(model, tok):
    so = parse_completion({"prompt": "a", "guided_grammar": 'root ::= "yes" | "no"'}, model, tok).request.params
    assert so.structured_output.kind == K.GRAMMAR and "start:" in so.structured_output.spec
    check_structured(sampling_params_from_proto(so).structured_output, tok)


def test_text_and_null_mean_unconstrained(model, tok):
    for extra in ({"response_format": {"type": "text"}}, {"guided_json": None}):
        assert not parse_completion({"prompt": "a", **extra}, model, tok).request.params.HasField("structured_output")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "x": 1}}},
     "response_format.json_schema.x"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{bad"}}},
     "response_format.json_schema.schema"),
    ({"guided_choice": ["a", 5]}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_grammar": 'root ::= ("a"'}, "guided_grammar"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"xml": "a"}}, "structured_outputs.xml"),
])
def test_openai_refusals_name_the_field(model, tok, extra, param):
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": "a", **extra}, model, tok)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("extra, param", [
    ({"guided_json": {"type": "foo"}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema"),
    ({"guided_regex": "(a"}, "guided_regex"),
    ({"guided_grammar": 'start: foo\nfoo: foo "a"'}, "guided_grammar"),
])
def test_compile_errors_of_the_shared_validation_name_the_openai_field(model, tok, extra, param):
    """The router's one validation (build_request) compiles the constraint; its error is renamed to
    the JSON field the user sent it in."""
    parsed = parse_completion({"prompt": "a", **extra}, model, tok)
    with pytest.raises(InvalidRequestError) as e:
        build_request(parsed.request, model, tok, None)
    error = from_invalid_request(e.value, parsed.rename)
    assert error.status == 400 and error.param == param


def test_the_sdk_sets_one_constraint():
    from tandem.client import build_generate_request

    so = build_generate_request("a", json_schema=SCHEMA).params.structured_output
    assert so.kind == K.JSON_SCHEMA and json.loads(so.spec) == SCHEMA
    so = build_generate_request("a", choice=["x", "y"]).params.structured_output
    assert so.kind == K.CHOICE and list(so.choices) == ["x", "y"]
    assert not build_generate_request("a").params.HasField("structured_output")
    with pytest.raises(ValueError, match="at most one"):
        build_generate_request("a", regex="a", json_object=True)
