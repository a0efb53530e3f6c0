"""The OpenAPI 3.0 document of the router's HTTP API, served at GET /openapi.json.

Hand-written (the handlers parse JSON themselves, router/openai_api/requests.py): the routes,
the main request fields with their ranges, and the error shape every non-2xx answer has. Unknown
fields are allowed (they are ignored and named in X-Tandem-Ignored-Fields). `make fuzz` runs
schemathesis against it (benchmarks/fuzz.py): no request it generates may get a 5xx.
"""
from __future__ import annotations

INT32 = 2 ** 31 - 1

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}}

_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}


def _common(max_model_len: int) -> dict:
    return {
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": INT32,
                       "description": f"tokens to generate; prompt + output must fit {max_model_len}"},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"},
                                                            "continuous_usage_stats": {"type": "boolean"}}},
        "stop": _STOP,
        "stop_token_ids": _TOKEN_IDS,
        "seed": {"type": "integer", "minimum": 0},
        "user": {"type": "string"},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100,
                                                                  "maximum": 100}},
        "ignore_eos": {"type": "boolean"},
        "min_tokens": {"type": "integer", "minimum": 0},
        "return_token_ids": {"type": "boolean"},
        "request_id": {"type": "string", "maxLength": 256},
        "priority": {"type": "integer"},
        "expected_output_tokens": {"type": "integer", "minimum": 0},
        "resume_token_ids": _TOKEN_IDS,
        "slo": {"type": "object", "properties": {"ttft_s": {"type": "number", "minimum": 0},
                                                 "tpot_s": {"type": "number", "minimum": 0}}},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object"}}},
    }


def _answers(ok_schema: dict, streams: bool) -> dict:
    ok = {"application/json": {"schema": ok_schema}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string"}}
    out = {"200": {"description": "the answer (server-sent events with stream: true)", "content": ok}}
    for status, why in (("400", "a field to fix (error.param names it)"), ("401", "an API key is required"),
                        ("404", "unknown model"), ("409", "request_id already running"),
                        ("429", "the cluster is full or cannot meet the SLO now: retry after Retry-After seconds"),
                        ("503", "no instance can serve now: retry"), ("504", "the deadline passed")):
        out[status] = {"description": why, "content": {"application/json": {"schema": _ERROR}}}
    return out


def openapi_document(model_id: str, max_model_len: int) -> dict:
    """The document for a router serving `model_id` (context `max_model_len` tokens)."""
    common = _common(max_model_len)
    completion = {"type": "object", "required": ["prompt"], "additionalProperties": True, "properties": {
        **common,
        "prompt": {"oneOf": [{"type": "string"}, _TOKEN_IDS, {"type": "array", "minItems": 1, "maxItems": 1,
                                                              "items": {"type": "string"}}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "echo": {"type": "boolean"},
        "best_of": {"type": "integer", "minimum": 1}}}
    function = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}, "description": {"type": "string"},
        "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}
    tool_call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
        "tool_calls": {"type": "array", "items": tool_call},      # assistant: calls of an earlier reply
        "tool_call_id": {"type": "string"}}}                      # tool: the call it answers
    chat = {"type": "object", "required": ["messages"], "additionalProperties": True, "properties": {
        **common,
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": INT32},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "add_generation_prompt": {"type": "boolean"},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]}, "function": function}}},
        "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                                  {"type": "object", "required": ["type", "function"], "properties": {
                                      "type": {"type": "string", "enum": ["function"]},
                                      "function": {"type": "object", "required": ["name"],
                                                   "properties": {"name": {"type": "string"}}}}}]},
        "parallel_tool_calls": {"type": "boolean"}}}
    model_card = {"type": "object", "required": ["id", "object"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}
    json_body = lambda schema: {"required": True, "content": {"application/json": {"schema": schema}}}  # noqa: E731
    return {
        "openapi": "3.0.3",
        "info": {"title": "Tandem router (OpenAI-compatible)", "version": "1",
                 "description": f"Serves {model_id}. Errors are OpenAI's error JSON, never a traceback."},
        "paths": {
            "/v1/completions": {"post": {"operationId": "completions", "requestBody": json_body(completion),
                                         "responses": _answers({"type": "object"}, streams=True)}},
            "/v1/chat/completions": {"post": {"operationId": "chat_completions", "requestBody": json_body(chat),
                                              "responses": _answers({"type": "object"}, streams=True)}},
            "/v1/models": {"get": {"operationId": "models", "responses": {"200": {
                "description": "the served model", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"object": {"type": "string"},
                                                     "data": {"type": "array", "items": model_card}}}}}}}}},
            "/v1/models/{model_id}": {"get": {
                "operationId": "model",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the model card",
                                      "content": {"application/json": {"schema": model_card}}},
                              "404": {"description": "not served here",
                                      "content": {"application/json": {"schema": _ERROR}}}}}},
        },
    }
