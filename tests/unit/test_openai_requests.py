"""OpenAI request bodies → GenerateRequest: what is accepted, what is refused with a 400 naming the
field, chat templates (a model's own from tokenizer_config.json / chat_template.jinja, and the
documented default), and the OpenAI JSON shapes of answers and errors."""
from __future__ import annotations

import json

import grpc
import pytest

from router.openai_api.chat_template import ChatTemplate
from router.openai_api.errors import ApiError, from_invalid_request, from_status
from router.openai_api.requests import parse_chat, parse_completion
from router.openai_api.responses import Answer, TokenTexts
from services.engine.config import ModelConfigError
from services.engine.sampling_params import InvalidRequestError
from tandem.v1 import serving_pb2



def refused(fn, *args, status=400) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert e.value.status == status
    body = e.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return e.value


# ---- completions ---------------------------------------------------------------------------------
def test_text_prompt_defaults_follow_openai(model, tok):
    p = parse_completion({"model": "tiny", "prompt": "Hello"}, model, tok)
    r = p.request
    assert r.prompt == "Hello" and not r.prompt_token_ids
    assert r.params.max_tokens == 16 and r.params.temperature == 1.0 and r.params.top_p == 1.0
    assert not r.params.HasField("seed") and not r.params.HasField("logprobs")
    assert (p.kind, p.stream, p.include_usage, p.logprobs) == ("completion", False, False, None)


@pytest.mark.parametrize("prompt, ids", [([5, 6, 7], [5, 6, 7]), ([[5, 6]], [5, 6])])
def test_token_id_prompts(model, tok, prompt, ids):
    assert list(parse_completion({"prompt": prompt}, model, tok).request.prompt_token_ids) == ids


def test_one_text_in_a_list(model, tok):
    assert parse_completion({"prompt": ["Hi"]}, model, tok).request.prompt == "Hi"


def test_every_supported_field_lands_in_the_request(model, tok):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 11,
            "stop": ["\n", "x"], "logprobs": 3, "stream": True, "user": "u1", "n": 1, "best_of": 1,
            "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "suffix": None,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "request_id": "my-id", "priority": 3, "slo": {"ttft_s": 0.5, "tpot_s": 0.05}, "top_k": 40,
            "ignore_eos": False, "stop_token_ids": [2], "return_token_ids": True}
    p = parse_completion(body, model, tok)
    r = p.request
    assert (r.params.max_tokens, r.params.top_k, r.params.seed, r.params.logprobs) == (7, 40, 11, 3)
    assert r.params.temperature == pytest.approx(0.5) and r.params.top_p == pytest.approx(0.9)
    assert list(r.params.stop) == ["\n", "x"] and list(r.params.stop_token_ids) == [2]
    assert (r.request_id, r.priority) == ("my-id", 3)
    assert r.slo.ttft_s == pytest.approx(0.5) and r.slo.tpot_s == pytest.approx(0.05)
    assert p.stream and p.include_usage and p.continuous_usage and p.return_token_ids and p.logprobs == 3


def test_sampling_extras_land_in_the_params(model, tok):
    """What vLLM / SGLang clients send: penalties, logit_bias, min_p, min_tokens, n, best_of, and
    the neutral values of what Tandem does anyway (vllm bench serve sends repetition_penalty 1.0)."""
    body = {"prompt": "a", "max_tokens": 8, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
            "logit_bias": {"5": -100, "7": 2.5}, "min_p": 0.1, "min_tokens": 3, "n": 2, "best_of": 3,
            "skip_special_tokens": True, "spaces_between_special_tokens": True, "include_stop_str_in_output": False,
            "use_beam_search": False, "length_penalty": 1.0, "guided_json": None, "bad_words": []}
    p = parse_completion(body, model, tok)
    sp = p.request.params
    assert (sp.presence_penalty, sp.frequency_penalty, sp.min_tokens, sp.n, sp.best_of) == (0.5, -1.0, 3, 2, 3)
    assert sp.repetition_penalty == pytest.approx(1.2) and sp.min_p == pytest.approx(0.1)
    assert dict(sp.logit_bias) == {5: -100.0, 7: 2.5} and p.n == 2 and p.ignored == []
    neutral = parse_completion({"prompt": "a", "repetition_penalty": 1.0}, model, tok).request.params
    assert not neutral.HasField("repetition_penalty")


def test_unknown_fields_are_ignored_and_named(model, tok):
    p = parse_completion({"prompt": "a", "frobnicate": 1, "rid": "x"}, model, tok)
    assert p.ignored == ["frobnicate", "rid"]
    c = parse_chat({"messages": [{"role": "user", "content": "x"}], "separate_reasoning": True}, model, tok,
                   ChatTemplate.default())
    assert c.ignored == ["separate_reasoning"] and c.n == 1


def test_top_k_minus_one_means_off(model, tok):
    assert parse_completion({"prompt": "a", "top_k": -1}, model, tok).request.params.top_k == 0


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "a", "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": "a", "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"prompt": "a", "presence_penalty": -3}, "presence_penalty"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "min_p": 1.5}, "min_p"),
    ({"prompt": "a", "logit_bias": {"x": 10}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"5": "1"}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": [5]}, "logit_bias"),
    ({"prompt": "a", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"prompt": "a", "skip_special_tokens": False}, "skip_special_tokens"),
    ({"prompt": "a", "use_beam_search": True}, "use_beam_search"),
    ({"prompt": "a", "guided_choice": []}, "guided_choice"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "messages"),   # the chat endpoint's
    ({"prompt": "a", "suffix": "end"}, "suffix"),
    ({"prompt": "a", "functions": [{"name": "f"}]}, "functions"),
    ({"prompt": "a", "tools": []}, "tools"),                       # a chat-only field on /v1/completions
    ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "stream": True, "stream_options": {"chunk": 1}}, "stream_options.chunk"),
    ({"prompt": "a", "min_tokens": 9, "max_tokens": 4, "ignore_eos": True}, "min_tokens"),
    ({"prompt": "a", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "a", "slo": {"ttft": 1}}, "slo.ttft"),
    ({"prompt": "a", "request_id": "x" * 300}, "request_id"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({}, "prompt"),
])
def test_unsupported_or_malformed_is_a_400_naming_the_field(model, tok, body, param):
    e = refused(parse_completion, body, model, tok)
    assert e.param == param and e.message.startswith(param)


@pytest.mark.parametrize("field, value, words", [
    ("max_tokens", "16", "integer"), ("max_tokens", 2.5, "integer"), ("max_tokens", True, "integer"),
    ("max_tokens", 0, ">= 1"), ("temperature", "hot", "number"), ("temperature", -0.5, ">= 0"),
    ("top_p", [1], "number"), ("seed", -1, ">= 0"), ("seed", 1.5, "integer"), ("stop", 5, "string"),
    ("stop", ["a", 1], "string"), ("stream", "yes", "true or false"), ("logprobs", 21, "<= 20"),
    ("logprobs", True, "integer"), ("priority", "high", "integer"), ("user", 7, "string"),
    ("stop_token_ids", [1.5], "integers"), ("slo", [1], "object"), ("echo", 1, "true or false"),
    # make fuzz found it: an id past int32 was a ValueError in protobuf, a 500
    ("stop_token_ids", [10 ** 24], "[0, 2147483647]"), ("stop_token_ids", [2, -1], "got -1"),
])
def test_wrong_types_name_the_field_and_the_type(model, tok, field, value, words):
    e = refused(parse_completion, {"prompt": "a", field: value}, model, tok)
    assert e.param == field and words in e.message


def test_unknown_model_is_404_model_not_found(model, tok):
    e = refused(parse_completion, {"model": "gpt-4", "prompt": "a"}, model, tok, status=404)
    assert e.code == "model_not_found" and "tiny" in e.message and e.outcome == "not_found"


def test_min_tokens_with_ignore_eos_is_exact(model, tok):
    p = parse_completion({"prompt": "a", "max_tokens": 5, "min_tokens": 5, "ignore_eos": True}, model, tok)
    assert p.request.params.ignore_eos and p.request.params.max_tokens == 5


def test_echo_keeps_the_prompt_text(model, tok):
    assert parse_completion({"prompt": "Hey", "echo": True}, model, tok).echo_text == "Hey"
    ids = tok.encode("yo", add_bos=False)
    assert parse_completion({"prompt": ids, "echo": True}, model, tok).echo_text == "yo"


def test_shared_validation_errors_get_openai_field_names():
    e = from_invalid_request(InvalidRequestError("params.max_tokens", "too big; lower it"), {})
    assert (e.status, e.param, e.message) == (400, "max_tokens", "max_tokens: too big; lower it")
    e = from_invalid_request(InvalidRequestError("token_ids", "id 999 is outside"), {"token_ids": "prompt"})
    assert e.param == "prompt"


@pytest.mark.parametrize("code, status", [(grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                                          (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.INTERNAL, 500),
                                          (grpc.StatusCode.INVALID_ARGUMENT, 400)])
def test_route_errors_map_to_http_statuses(code, status):
    e = from_status(code, "why")
    assert e.status == status and e.body()["error"]["message"] == "why" and e.outcome == code.name.lower()


# ---- chat ----------------------------------------------------------------------------------------
def test_chat_default_template_is_plain_and_adds_bos(model, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                         {"type": "text", "text": "b"}]}]
    p = parse_chat({"messages": msgs}, model, tok, ChatTemplate.default())
    text = "System: Be brief.\nUser: Hi\nAssistant: Hello\nSystem: a\nb\nAssistant:"
    assert list(p.request.prompt_token_ids) == tok.encode(text, add_bos=True)
    room = model.max_position_embeddings - len(p.request.prompt_token_ids)
    assert p.request.params.max_tokens == room          # chat's default: the rest of the context
    assert p.kind == "chat" and p.logprobs is None


def test_chat_logprobs_and_max_completion_tokens(model, tok):
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 4,
            "max_completion_tokens": 9, "response_format": {"type": "text"}, "tool_choice": "none", "store": False,
            "add_generation_prompt": False}
    p = parse_chat(body, model, tok, ChatTemplate.default())
    assert p.logprobs == 4 and p.request.params.logprobs == 4 and p.request.params.max_tokens == 9
    assert list(p.request.prompt_token_ids) == tok.encode("User: x\n")
    p = parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, model, tok,
                   ChatTemplate.default())
    assert p.logprobs == 0


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": "x"}], "best_of": 3}, "best_of"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"enable_thinking": False}},
     "chat_template_kwargs"),
])
def test_chat_refusals_name_the_field(model, tok, body, param):
    e = refused(parse_chat, body, model, tok, ChatTemplate.default())
    assert e.param == param


def test_model_template_from_tokenizer_config(tmp_path, model, tok):
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system messages') }}{% endif %}"
                "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    t = ChatTemplate.for_model(str(tmp_path))
    assert not t.add_bos and t.source.endswith("tokenizer_config.json")
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user]hi</s>[assistant]"
    e = refused(parse_chat, {"messages": [{"role": "system", "content": "x"}]}, model, tok, t)
    assert e.param == "messages" and "no system messages" in e.message


def test_named_templates_and_jinja_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]}))
    assert ChatTemplate.for_model(str(tmp_path)).render([{"role": "user", "content": "a"}]) == "D1"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert ChatTemplate.for_model(str(tmp_path)).render([{"role": "user", "content": "a"}]) == "Ja"


def test_broken_templates_fail_at_startup(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ModelConfigError, match="does not compile"):
        ChatTemplate.for_model(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x", "template": "T"}]}))
    with pytest.raises(ModelConfigError, match="default"):
        ChatTemplate.for_model(str(tmp_path))


def test_no_template_means_the_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert ChatTemplate.for_model(str(tmp_path)).source == "the default template"
    assert ChatTemplate.for_model(None).add_bos


# ---- answers -------------------------------------------------------------------------------------
def _msg(index, ids, text, finished=False, logprobs=(), top=()):
    m = serving_pb2.GenerateResponse(request_id="r", index=index, token_ids=ids, text=text, finished=finished,
                                     logprobs=list(logprobs))
    for t in top:
        m.top_logprobs.add(token_ids=[a for a, _ in t], logprobs=[b for _, b in t])
    if finished:
        m.finish_reason = serving_pb2.FINISH_REASON_LENGTH
        m.usage.cached_prompt_tokens = 2
    return m


def test_completion_answer_with_logprobs_and_echo(model, tok):
    p = parse_completion({"prompt": "ab", "max_tokens": 2, "logprobs": 1, "return_token_ids": True}, model, tok)
    p.echo_text = "ab"
    ids = tok.encode("xy", add_bos=False)
    a = Answer(p, "r1", "tiny", 3, TokenTexts(tok), [1, 2, 3])
    a.add(_msg(0, [ids[0]], "x", logprobs=[-0.5], top=[[(ids[0], -0.5)]]))
    a.add(_msg(1, [ids[1]], "y", finished=True, logprobs=[float("-inf")], top=[[(ids[0], -0.25)]]))
    body = a.response()
    choice = body["choices"][0]
    assert body["id"] == "cmpl-r1" and body["object"] == "text_completion" and body["model"] == "tiny"
    assert choice["text"] == "abxy" and choice["finish_reason"] == "length" and choice["token_ids"] == ids
    assert choice["logprobs"] == {"tokens": ["x", "y"], "token_logprobs": [-0.5, -9999.0],
                                  "top_logprobs": [{"x": -0.5}, {"x": -0.25}], "text_offset": [2, 3]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    json.dumps(body, allow_nan=False)


def test_out_of_order_messages_are_an_internal_error(model, tok):
    from router.request.dispatch import RouteError
    a = Answer(parse_completion({"prompt": "a"}, model, tok), "r", "tiny", 1, TokenTexts(tok), [1])
    with pytest.raises(RouteError):
        a.add(_msg(3, [5], "x"))


def test_chat_stream_chunks(model, tok):
    p = parse_chat({"messages": [{"role": "user", "content": "x"}], "stream": True,
                    "stream_options": {"include_usage": True}}, model, tok, ChatTemplate.default())
    a = Answer(p, "r2", "tiny", 4, TokenTexts(tok), [])
    first = a.chunks(a.add(_msg(0, [70], "C")), False)
    last = a.chunks(a.add(_msg(1, [71], "D", finished=True)), True)
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "C"}]
    assert last[0]["choices"][0] == {"index": 0, "delta": {"content": "D"}, "logprobs": None, "finish_reason": "length"}
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in first + last)
    usage = a.usage_chunk()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2


def test_response_headers_are_safe_for_any_field_name_and_request_id():
    """make fuzz found it: an unknown field named "a\\nb" made aiohttp drop the connection without a
    response (the raw name went into X-Tandem-Ignored-Fields)."""
    from router.openai_api.app import header_value, ignored_fields_header

    assert ignored_fields_header(["extra", "my_field"]) == "extra,my_field"
    value = ignored_fields_header(["a\nb", "x\r\ny: 1", "\x00", "é🙂", "a,b"])
    assert value.isascii() and value.isprintable() and "\n" not in value and "\r" not in value
    assert value == "a%0Ab,x%0D%0Ay: 1,%00,%C3%A9%F0%9F%99%82,a%2Cb"
    assert header_value("req-1 (retry #2) 100%") == "req-1 (retry #2) 100%"      # printable ASCII unchanged
    assert len(header_value("x" * 5000)) == 1024
