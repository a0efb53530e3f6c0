"""Structured-output fields of an OpenAI request → tandem.v1.StructuredOutput.

Accepted (at most one constraint per request; a second is a 400 naming it):

    response_format  {"type": "text"} (none), {"type": "json_object"},
                     {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
                     (OpenAI; both endpoints, as vLLM)
    guided_json      a schema object or its JSON text       (vLLM)
    guided_regex     a regular expression                   (vLLM)
    guided_choice    a non-empty list of strings            (vLLM)
    guided_grammar   a Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp / vLLM's
                     xgrammar style, converted to Lark)      (vLLM)
    structured_outputs  {"json" | "regex" | "choice" | "grammar" | "json_object": ...} (vLLM >= 0.10)
    json_schema, regex, ebnf    SGLang's top-level strings (schema text, regex, GBNF)

`strict` is accepted either way: the output always follows the schema. Whether a schema or grammar
compiles (and accepts some output) is checked by the shared validation; its error names the field
the constraint came from (`rename`).
"""
from __future__ import annotations

import json

from llguidance.gbnf_to_lark import any_to_lark

from router.openai_api.errors import invalid
from tandem.v1 import serving_pb2

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
          "json_schema", "regex", "ebnf")
K = serving_pb2


def parse_structured(body: dict, params: serving_pb2.SamplingParams) -> str | None:
    """Set params.structured_output from body; returns the JSON path of the field it came from
    (None: unconstrained). Raises ApiError (400) naming the field."""
    found = None
    for name in FIELDS:
        value = body.get(name)
        if value is None:
            continue
        parsed = _one(name, value)
        if parsed is None:
            continue
        if found is not None:
            raise invalid(name, f"only one structured-output constraint per request; {found[0]} is set already")
        found = parsed
    if found is None:
        return None
    where, so = found
    params.structured_output.CopyFrom(so)
    return where


def _one(name: str, value) -> tuple[str, serving_pb2.StructuredOutput] | None:
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    if name in ("guided_json", "json_schema"):
        return name, _schema(name, value)
    if name in ("guided_regex", "regex"):
        return name, _text(name, value, K.STRUCTURED_KIND_REGEX)
    if name == "guided_choice":
        return name, _choice(name, value)
    return name, _grammar(name, value)            # guided_grammar, ebnf


def _response_format(value) -> tuple[str, serving_pb2.StructuredOutput] | None:
    if not isinstance(value, dict):
        raise invalid("response_format", "must be an object with a type: text, json_object or json_schema")
    kind = value.get("type")
    extra = set(value) - {"type", "json_schema"}
    if extra:
        raise invalid(f"response_format.{sorted(extra)[0]}", "unrecognized; response_format takes type and json_schema")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", serving_pb2.StructuredOutput(kind=K.STRUCTURED_KIND_JSON_OBJECT)
    if kind != "json_schema":
        raise invalid("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", "is required with type json_schema: "
                                                     "{\"name\": ..., \"schema\": {...}}")
    for key in spec:
        if key not in ("name", "schema", "strict", "description"):
            raise invalid(f"response_format.json_schema.{key}", "unrecognized; supported: name, schema, strict, "
                                                                "description")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 64):
        raise invalid("response_format.json_schema.name", "must be a string of 1 to 64 characters")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise invalid("response_format.json_schema.strict", "must be true or false")
    if "schema" not in spec or spec["schema"] is None:
        raise invalid("response_format.json_schema.schema", "is required: the JSON schema the output follows")
    where = "response_format.json_schema.schema"
    return where, _schema(where, spec["schema"])


def _structured_outputs(value) -> tuple[str, serving_pb2.StructuredOutput] | None:
    if not isinstance(value, dict):
        raise invalid("structured_outputs", "must be an object with one of json, regex, choice, grammar, json_object")
    known = {"json", "regex", "choice", "grammar", "json_object"}
    for key in value:
        if key not in known:
            raise invalid(f"structured_outputs.{key}", f"unrecognized; supported: {', '.join(sorted(known))}")
    set_keys = [k for k in ("json", "regex", "choice", "grammar", "json_object") if value.get(k) not in (None, False)]
    if not set_keys:
        return None
    if len(set_keys) > 1:
        raise invalid(f"structured_outputs.{set_keys[1]}", f"only one constraint; {set_keys[0]} is set already")
    key = set_keys[0]
    where = f"structured_outputs.{key}"
    v = value[key]
    if key == "json":
        return where, _schema(where, v)
    if key == "regex":
        return where, _text(where, v, K.STRUCTURED_KIND_REGEX)
    if key == "choice":
        return where, _choice(where, v)
    if key == "grammar":
        return where, _grammar(where, v)
    if v is not True:
        raise invalid(where, "must be true or false")
    return where, serving_pb2.StructuredOutput(kind=K.STRUCTURED_KIND_JSON_OBJECT)


def _schema(where: str, value) -> serving_pb2.StructuredOutput:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise invalid(where, f"is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise invalid(where, "must be a JSON schema object")
    return serving_pb2.StructuredOutput(kind=K.STRUCTURED_KIND_JSON_SCHEMA, spec=json.dumps(value))


def _text(where: str, value, kind) -> serving_pb2.StructuredOutput:
    if not isinstance(value, str) or not value:
        raise invalid(where, "must be a non-empty string")
    return serving_pb2.StructuredOutput(kind=kind, spec=value)


def _choice(where: str, value) -> serving_pb2.StructuredOutput:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise invalid(where, "must be a non-empty list of non-empty strings")
    return serving_pb2.StructuredOutput(kind=K.STRUCTURED_KIND_CHOICE, choices=value)


def _grammar(where: str, value) -> serving_pb2.StructuredOutput:
    if not isinstance(value, str) or not value.strip():
        raise invalid(where, "must be a non-empty grammar (Lark, or GBNF with ::= rules)")
    try:
        lark = any_to_lark(value)          # Lark stays as it is; GBNF (`root ::= ...`) is converted
    except Exception as e:                 # the converter raises its own error types
        raise invalid(where, f"invalid grammar: {str(e).strip().splitlines()[0][:300] if str(e).strip() else e!r}") \
            from None
    return serving_pb2.StructuredOutput(kind=K.STRUCTURED_KIND_GRAMMAR, spec=lark)
