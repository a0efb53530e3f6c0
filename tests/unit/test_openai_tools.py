"""Chat tool calls: tools / tool_choice / parallel_tool_calls parsing and refusals, the schema a
required or named choice constrains the output to, reading a reply as tool calls, the prompt a
template without tool support gets, and the answer's shapes (whole and streamed) — no cluster."""
from __future__ import annotations

import json

import pytest

from router.openai_api.chat_template import ChatTemplate
from router.openai_api.errors import ApiError
from router.openai_api.requests import parse_chat
from router.openai_api.responses import Answer, TokenTexts
from router.openai_api.tools import extract, maybe_call, parse_tools
from tandem.v1 import serving_pb2

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]



def param_of(body) -> str:
    with pytest.raises(ApiError) as e:
        parse_tools(body)
    assert e.value.status == 400
    return e.value.param


def test_modes_and_defaults():
    assert parse_tools({}) is None and parse_tools({"tool_choice": "none"}) is None
    auto = parse_tools({"tools": [WEATHER, TIME]})
    assert auto.mode == "auto" and auto.offered and not auto.constrained and auto.schema() is None
    assert [t.name for t in auto.tools] == ["get_weather", "get_time"]
    assert auto.tools[1].parameters == {"type": "object", "properties": {}}      # no parameters: an empty object
    none = parse_tools({"tools": [WEATHER], "tool_choice": "none"})
    assert none.mode == "none" and not none.offered
    named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.constrained and named.schema() == WEATHER["function"]["parameters"]
    required = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False})
    schema = required.schema()
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [alt["properties"]["name"]["const"] for alt in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert "maxItems" not in parse_tools({"tools": [WEATHER], "tool_choice": "required"}).schema()


@pytest.mark.parametrize("body, param", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]}, "tools[0].function.returns"),
    ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools[0].extra"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_refusals_name_the_field(body, param):
    assert param_of(body) == param


def test_reading_replies_as_calls():
    auto = parse_tools({"tools": [WEATHER, TIME]})
    content, calls = extract(auto, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert content is None and len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    tagged = '<tool_call>\n{"name": "get_time", "parameters": {}}\n</tool_call><tool_call>{"name": "get_weather", ' \
             '"arguments": {"city": "Oslo"}}</tool_call>'
    assert [c["function"]["name"] for c in extract(auto, tagged)[1]] == ["get_time", "get_weather"]
    listed = '[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}]'
    assert len(extract(auto, listed)[1]) == 2
    serial = parse_tools({"tools": [WEATHER, TIME], "parallel_tool_calls": False})
    assert len(extract(serial, listed)[1]) == 1
    for text in ("It is sunny.", '{"name": "unknown", "arguments": {}}', '{"name": "get_time"}',
                 '{"name": "get_time", "arguments": {}} and more', '<tool_call>{"name": "get_time", "arguments": {}}'
                 '</tool_call> trailing text', '{"city": "Paris"}', '{"name": ["get_time"], "arguments": {}}'):
        assert extract(auto, text) == (text, [])
    named = parse_tools({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    content, calls = extract(named, ' {"city" : "Rome"} ')
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert extract(named, '{"city": "Ro')[1][0]["function"]["arguments"] == '{"city": "Ro'   # cut short: as generated


def test_maybe_call_holds_only_what_can_still_be_a_call():
    for text in ("", "  ", "{", ' {"na', "[", "<tool", "<tool_call>", "<tool_call>{"):
        assert maybe_call(text), text
    for text in ("Hi", " It", "<b>", "<tool_c x"):
        assert not maybe_call(text), text


def test_template_without_tools_gets_a_system_message_and_history(model, tok):
    history = [*USER, {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    p = parse_chat({"messages": history, "tools": [WEATHER]}, model, tok, ChatTemplate.default())
    text = tok.decode(list(p.request.prompt_token_ids))
    assert text.startswith("System: You can call these functions") and '"name": "get_weather"' in text
    assert 'Assistant: {"name": "get_weather", "arguments": {"city": "Paris"}}\nTool: 18 C\nAssistant:' in text
    assert not p.request.params.HasField("structured_output") and p.tools.mode == "auto"
    plain = parse_chat({"messages": USER, "tools": [WEATHER], "tool_choice": "none"}, model, tok, ChatTemplate.default())
    assert plain.tools is None and "functions" not in tok.decode(list(plain.request.prompt_token_ids))


def test_template_with_tools_receives_them(model, tok):
    template = ChatTemplate("test", "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                                    "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}", add_bos=False)
    assert template.uses_tools
    assert not ChatTemplate("prose", "Our tools are great. {{ messages | length }}", add_bos=False).uses_tools
    p = parse_chat({"messages": USER, "tools": [WEATHER, TIME]}, model, tok, template)
    assert tok.decode(list(p.request.prompt_token_ids)) == "[get_weather][get_time]user:Weather in Paris?;"


def test_required_and_named_constrain_the_output(model, tok):
    p = parse_chat({"messages": USER, "tools": [WEATHER], "tool_choice": "required"}, model, tok, ChatTemplate.default())
    so = p.request.params.structured_output
    assert so.kind == serving_pb2.STRUCTURED_KIND_JSON_SCHEMA and json.loads(so.spec)["type"] == "array"
    assert p.rename["structured_output"] == "tools"
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": USER, "tools": [WEATHER], "tool_choice": "required",
                    "response_format": {"type": "json_object"}}, model, tok, ChatTemplate.default())
    assert e.value.param == "tool_choice"


def _answer(model, tok, body, pieces, finish=serving_pb2.FINISH_REASON_STOP, stream=False):
    parsed = parse_chat({"messages": USER, **body, "stream": stream}, model, tok, ChatTemplate.default())
    answer = Answer(parsed, "r1", "m", 3, TokenTexts(tok), [1, 2, 3])
    chunks = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        m = serving_pb2.GenerateResponse(index=i, token_ids=[65], text=piece, finished=last,
                                         finish_reason=finish if last else serving_pb2.FINISH_REASON_UNSPECIFIED)
        chunks += answer.chunks(answer.add(m), last)
    return answer, chunks


def test_whole_answers(model, tok):
    answer, _ = _answer(model, tok, {"tools": [WEATHER]}, ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    choice = answer.response()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    named = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = _answer(model, tok, named, ['{"city": "Oslo"}'])[0].response()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"][0]["function"]["arguments"] == \
        '{"city": "Oslo"}'
    choice = _answer(model, tok, {"tools": [WEATHER]}, ["It is ", "sunny."])[0].response()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."} and choice["finish_reason"] == "stop"
    cut = _answer(model, tok, {"tools": [WEATHER]}, ['{"name": "get_we'], finish=serving_pb2.FINISH_REASON_LENGTH)[0]
    assert cut.response()["choices"][0]["message"]["content"] == '{"name": "get_we'


def test_streamed_calls_are_held_then_sent_whole(model, tok):
    _, chunks = _answer(model, tok, {"tools": [WEATHER]}, ['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'],
                        stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and len(chunks) == 2
    call = deltas[1]["tool_calls"][0]
    assert call["index"] == 0 and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert chunks[1]["choices"][0]["finish_reason"] == "tool_calls"
    # text that cannot be a call streams as it comes, what was held first included
    _, chunks = _answer(model, tok, {"tools": [WEATHER]}, [" ", "Hello", " there"], stream=True)
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:]]
    assert texts == [" Hello", " there"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # a reply that looked like a call but was not: sent as content at the end
    _, chunks = _answer(model, tok, {"tools": [WEATHER]}, ["{", '"x": 1}'], stream=True)
    assert [c["choices"][0]["delta"] for c in chunks[1:]] == [{"content": '{"x": 1}'}]
