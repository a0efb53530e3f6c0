"""The router's OpenAI-compatible API on a real 1P+1D cluster, driven by the official `openai` client
and by raw HTTP: greedy tokens (completions and chat, streaming and not) equal transformers'
`generate` on the same weights (chat prompts rendered by transformers' own apply_chat_template),
logprobs match, errors come back in OpenAI's shape naming the field, a client that hangs up
cancels its request and frees every block, and the gRPC Abort RPC reaches HTTP requests."""
from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from tandem import Client
from tests.conftest import random_prompts
from tests.golden.hf_reference import hf_greedy
from tests.integration.cluster_helpers import assert_no_leaks, instances, worker_stats
from tests.integration.http_helpers import http, model_id, open_stream, read_until, scrape, value

pytestmark = pytest.mark.timeout(600)
MAX_TOKENS = 10
EOS = 2
CHATS = [[{"role": "user", "content": "Hello there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]



@pytest.fixture(scope="module")
def hf(chat_model_dir):
    """Token-id prompts, a text prompt and the chats, with transformers' greedy tokens and logprobs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    id_prompts = random_prompts([1, 7, 16, 17, 60], 512, seed=11)
    text = "The quick brown fox"
    text_ids = tokenizer(text)["input_ids"]                       # with BOS, as the router encodes text
    chat_ids = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"] for m in CHATS]
    prompts = id_prompts + [text_ids] + chat_ids
    ref = hf_greedy(chat_model_dir, prompts, MAX_TOKENS)
    return {"tokenizer": tokenizer, "id_prompts": id_prompts, "text": text, "text_ids": text_ids, "chat_ids": chat_ids,
            "ids": ref[:len(id_prompts)], "text_ref": ref[len(id_prompts)], "chat": ref[len(id_prompts) + 1:]}


def grpc_text(cluster, prompt_ids: list[int]) -> str:
    """The text the gRPC API returns for the same greedy request."""
    with Client(cluster.address) as c:
        return c.complete(token_ids=prompt_ids, max_tokens=MAX_TOKENS, temperature=0.0).text


def test_models_and_health(openai_cluster, client, chat_model_dir):
    name = model_id(chat_model_dir)
    models = client.models.list().data
    assert [m.id for m in models] == [name]
    assert models[0].model_extra["max_model_len"] == 2048 and models[0].model_extra["vocab_size"] == 512
    assert client.models.retrieve(name).id == name
    status, body = http(openai_cluster.http_address, "/health")
    assert status == 200 and body["status"] == "ok" and body["serving_instances"]["decode"] == 1
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completions_match_transformers(openai_cluster, client, hf, chat_model_dir):
    name = model_id(chat_model_dir)
    for prompt, (ref, ref_lp) in zip(hf["id_prompts"], hf["ids"]):
        r = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                      extra_body={"return_token_ids": True})
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == ref, f"prompt of {len(prompt)} tokens"
        assert choice.text == grpc_text(openai_cluster, prompt)             # the same text as the gRPC API's
        assert choice.finish_reason == ("stop" if ref[-1] == EOS else "length")
        assert choice.logprobs.token_logprobs == pytest.approx(ref_lp, abs=2e-3)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ref))
        assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == name
    ref, _ = hf["text_ref"]
    r = client.completions.create(model=name, prompt=hf["text"], max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref and r.usage.prompt_tokens == len(hf["text_ids"])


def test_streamed_completions_match_transformers(openai_cluster, client, hf, chat_model_dir):
    for prompt, (ref, _) in zip(hf["id_prompts"], hf["ids"]):
        chunks = list(client.completions.create(
            model=model_id(chat_model_dir), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True}))
        *token_chunks, usage = chunks
        assert [t for c in token_chunks for t in c.choices[0].model_extra["token_ids"]] == ref
        assert "".join(c.choices[0].text for c in token_chunks) == grpc_text(openai_cluster, prompt)
        assert [c.choices[0].finish_reason for c in token_chunks][-1] in ("stop", "length")
        assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
        assert usage.choices == [] and usage.usage.completion_tokens == len(ref)


def test_chat_uses_the_models_template_and_matches_transformers(openai_cluster, client, hf, chat_model_dir):
    for messages, prompt, (ref, ref_lp) in zip(CHATS, hf["chat_ids"], hf["chat"]):
        r = client.chat.completions.create(model=model_id(chat_model_dir), messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0, logprobs=True, top_logprobs=0,
                                           extra_body={"return_token_ids": True})
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == ref
        assert choice.message.role == "assistant"
        assert choice.message.content == grpc_text(openai_cluster, prompt)
        assert r.usage.prompt_tokens == len(prompt)
        assert [e.logprob for e in choice.logprobs.content] == pytest.approx(ref_lp, abs=2e-3)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")

        stream = client.chat.completions.create(model=model_id(chat_model_dir), messages=messages,
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        tokens = [t for c in chunks[1:] if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
        assert tokens == ref
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
        assert chunks[-1].usage.completion_tokens == len(ref)
        assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_seed_stop_echo_and_extras(client, chat_model_dir):
    name = model_id(chat_model_dir)
    kw = dict(model=name, prompt=[7, 8, 9, 10], max_tokens=12, temperature=0.9, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text                    # same seed, same tokens

    full = client.completions.create(model=name, prompt="abc", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    stop = next(text[i:i + 2] for i in range(1, len(text) - 2)
                if text[i:i + 2].isascii() and text[i:i + 2].isprintable() and text[i:i + 2] not in text[:i + 1])
    cut = client.completions.create(model=name, prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"

    echoed = client.completions.create(model=name, prompt="abc", max_tokens=3, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    assert echoed.choices[0].text.startswith("abc")
    assert echoed.choices[0].model_extra["token_ids"] == full.choices[0].model_extra["token_ids"][:3]

    exact = client.completions.create(model=name, prompt=[5, 6], max_tokens=9, temperature=0,
                                      extra_body={"ignore_eos": True, "min_tokens": 9, "priority": 2,
                                                  "request_id": "extras-1", "slo": {"ttft_s": 1.0}})
    assert exact.usage.completion_tokens == 9 and exact.id == "cmpl-extras-1"


def test_openai_client_sees_a_bad_request(client, chat_model_dir):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id(chat_model_dir), prompt="a", n=17)
    assert e.value.body["param"] == "n" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id(chat_model_dir), messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                       tool_choice={"type": "function", "function": {"name": "g"}})
    assert e.value.body["param"] == "tool_choice.function.name"


COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("path, body, status, param, words", [
    (COMPLETIONS, b'{"prompt": "a",', 400, None, "not valid JSON"),
    (COMPLETIONS, b"[1, 2]", 400, None, "JSON object"),
    (COMPLETIONS, b"\xff\xfe", 400, None, "UTF-8"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt", "string"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    (COMPLETIONS, {"prompt": "a", "temperature": "hot"}, 400, "temperature", "number"),
    (COMPLETIONS, {"prompt": "a", "stream": "yes"}, 400, "stream", "true or false"),
    (COMPLETIONS, {"prompt": "a", "n": 17}, 400, "n", "at most 16"),
    (COMPLETIONS, {"prompt": "a", "n": 2, "best_of": 1}, 400, "best_of", ">= n"),
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"1000": 5}}, 400, "logit_bias", "vocabulary"),
    (COMPLETIONS, {"prompt": "a", "presence_penalty": 2.5}, 400, "presence_penalty", "<= 2"),
    (COMPLETIONS, {"prompt": "a", "guided_json": {"type": "foo"}}, 400, "guided_json", "invalid JSON schema"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, 400, "best_of", "not a"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    (COMPLETIONS, {"prompt": [99999]}, 400, "prompt", "vocabulary"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 5000}, 400, "max_tokens", "context"),
    (COMPLETIONS, {"prompt": "a", "top_p": 0}, 400, "top_p", "(0, 1]"),
    (COMPLETIONS, {"prompt": "a", "model": "gpt-4"}, 404, "model", "does not exist"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}}, 400,
     "response_format.json_schema.schema", "Unsatisfiable"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]",
     "text parts"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id", "is required"),
    (CHAT, {"messages": [], "max_tokens": 3}, 400, "messages", "non-empty"),
])
def test_raw_http_errors_have_openai_shape(openai_cluster, path, body, status, param, words):
    before = scrape(openai_cluster.metrics_address)
    got, answer = http(openai_cluster.http_address, path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"] and "Traceback" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    after = scrape(openai_cluster.metrics_address)
    outcome = "invalid_argument" if status == 400 else "not_found"
    assert value(after, "tandem_requests_total", api="openai", outcome=outcome) == \
        value(before, "tandem_requests_total", api="openai", outcome=outcome) + 1


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nowhere", 404), ("GET", COMPLETIONS, 405),
                                                  ("DELETE", "/v1/models", 405)])
def test_unknown_routes_and_methods_are_openai_errors(openai_cluster, method, path, status):
    got, answer = http(openai_cluster.http_address, path, method=method)
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}


def _wait(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _decode_running(cluster) -> int:
    return sum(worker_stats(i.address, check_integrity=False).running for i in instances(cluster.address)
               if i.instance_id.startswith("decode"))


LONG = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_cancels_and_frees_every_block(openai_cluster, stream):
    c = openai_cluster
    before = scrape(c.metrics_address)
    sock = open_stream(c.http_address, COMPLETIONS, dict(LONG, stream=stream))
    try:
        if stream:
            read_until(sock, b"data: ")                    # tokens are flowing
        _wait(lambda: _decode_running(c) == 1, "the request to decode")
        decode_metrics = c.worker_metrics["decode-0"]
        assert value(scrape(decode_metrics), "tandem_kv_blocks_used", instance="decode-0") > 0
    finally:
        sock.close()                                       # the client hangs up mid-request
    assert_no_leaks(c.address)
    _wait(lambda: value(scrape(c.metrics_address), "tandem_requests_in_flight", api="openai") == 0, "in flight 0")
    after = scrape(c.metrics_address)
    for outcome, delta in (("cancelled", 1), ("finished", 0)):
        assert value(after, "tandem_requests_total", api="openai", outcome=outcome) == \
            value(before, "tandem_requests_total", api="openai", outcome=outcome) + delta
    assert value(scrape(c.worker_metrics["decode-0"]), "tandem_kv_blocks_used", instance="decode-0") == 0


def test_duplicate_request_id_is_409_and_abort_rpc_ends_an_http_stream(openai_cluster):
    c = openai_cluster
    sock = open_stream(c.http_address, COMPLETIONS, dict(LONG, stream=True, request_id="abort-me"))
    try:
        read_until(sock, b"data: ")
        status, answer = http(c.http_address, COMPLETIONS, dict(LONG, request_id="abort-me"))
        assert status == 409 and answer["error"]["param"] == "request_id"
        with Client(c.address) as grpc_client:
            assert grpc_client.abort("abort-me")
        tail = read_until(sock, b"data: [DONE]")
    finally:
        sock.close()
    events = [json.loads(line[6:]) for line in tail.decode().splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "abort"
    assert_no_leaks(c.address)


def test_concurrent_streams_through_the_openai_client(client, chat_model_dir, openai_cluster):
    """Eight streams at once through one router: each gets all its tokens once, in order."""
    results = {}

    def one(i):
        chunks = client.completions.create(model=model_id(chat_model_dir), prompt=[3 + i, 4, 5], max_tokens=20,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True,
                                                                                   "return_token_ids": True})
        results[i] = [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(8)) and all(len(v) == 20 for v in results.values())
    assert_no_leaks(openai_cluster.address)


def test_top_logprobs_on_every_token_of_a_disaggregated_request(client, chat_model_dir):
    r = client.chat.completions.create(model=model_id(chat_model_dir), messages=CHATS[0], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [len(e.top_logprobs) for e in r.choices[0].logprobs.content] == [2, 2, 2, 2]
