"""Chat tool calls through the official `openai` client on a real 1P+1D cluster: a named function and
tool_choice "required" constrain the output (the structured-output path) so every reply is a valid
call of a requested tool, whole and streamed; a conversation carrying earlier tool calls and tool
results is accepted; nothing leaks."""
from __future__ import annotations

import json

import pytest

from tests.integration.cluster_helpers import assert_no_leaks

pytestmark = pytest.mark.timeout(600)
# finite argument languages: the tiny random model must close them within max_tokens
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
LIGHTS = {"type": "function", "function": {
    "name": "set_lights", "parameters": {"type": "object", "additionalProperties": False, "required": ["on"],
                                         "properties": {"on": {"type": "boolean"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]




def valid(call_name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if call_name == "get_weather":
        return set(args) == {"city", "unit"} and args["city"] in ("Paris", "Oslo") and args["unit"] in ("C", "F")
    return call_name == "set_lights" and set(args) == {"on"} and isinstance(args["on"], bool)


def test_named_function_is_always_called(client, name, openai_cluster):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model=name, messages=ASK, tools=[WEATHER, LIGHTS], tool_choice=choice,
                                           temperature=temperature, seed=3, max_tokens=80)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and message.content is None
        (call,) = message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert valid(call.function.name, call.function.arguments)
    assert_no_leaks(openai_cluster.address)


def test_required_streamed_gives_one_call_of_a_listed_tool(client, name, openai_cluster):
    stream = client.chat.completions.create(model=name, messages=ASK, tools=[WEATHER, LIGHTS], tool_choice="required",
                                            parallel_tool_calls=False, temperature=0.7, seed=11, max_tokens=120,
                                            stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert valid(calls[0]["name"], calls[0]["arguments"])
    assert_no_leaks(openai_cluster.address)


def test_conversation_with_earlier_calls_and_results(client, name, openai_cluster):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 and sunny"}]
    r = client.chat.completions.create(model=name, messages=history, tools=[WEATHER], temperature=0, max_tokens=8)
    choice = r.choices[0]
    # the tiny random model answers in text (no JSON call): auto mode leaves it content
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert r.usage.prompt_tokens > 0
    assert_no_leaks(openai_cluster.address)
