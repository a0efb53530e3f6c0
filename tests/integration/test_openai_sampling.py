"""Sampling features through the official `openai` client on a real 1P+1D cluster (the first token
is sampled on the prefill instance, the rest on the decode instance, so the penalty state crosses
the KV handoff): repetition_penalty and logit_bias equal transformers' generate with
repetition_penalty / sequence_bias; frequency and presence penalties equal an in-process engine on
the same weights; min_tokens; n choices (streamed too) whose choice i is the seeded request with
seed + i; best_of; the extras vLLM clients send; bad values are 400s naming the field; nothing leaks."""
from __future__ import annotations

import openai
import pytest
import torch

from services.engine.builder import build_engine
from services.engine.sampling_params import SamplingParams
from tests.conftest import random_prompts
from tests.integration.cluster_helpers import assert_no_leaks
from tests.integration.http_helpers import http

pytestmark = pytest.mark.timeout(600)
EOS = 2
PROMPTS = random_prompts([12, 40], 512, seed=5)




def ids(client, name, prompt, **kw) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})}
    r = client.completions.create(model=name, prompt=prompt, temperature=0, extra_body=extra, **kw)
    return r.choices[0].model_extra["token_ids"]


def hf_generate(model_dir: str, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None          # as ignore_eos
    inp = torch.tensor([prompt])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens, do_sample=False,
                         **kw)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_and_logit_bias_equal_transformers(client, name, chat_model_dir):
    """transformers applies sequence_bias before repetition_penalty, as Tandem does. The tiny model
    never repeats greedily; logit_bias 1.5 on token 7 makes it repeat 7 on PROMPTS[1]."""
    changed = 0
    for prompt in PROMPTS:
        plain = ids(client, name, prompt, max_tokens=12, logit_bias={"7": 1.5})
        got = ids(client, name, prompt, max_tokens=12, logit_bias={"7": 1.5}, extra_body={"repetition_penalty": 1.8})
        assert got == hf_generate(chat_model_dir, prompt, 12, repetition_penalty=1.8, sequence_bias={(7,): 1.5})
        changed += got != plain
        bias = {plain[1]: -100.0, 77: 6.0}
        got = ids(client, name, prompt, max_tokens=12, logit_bias={str(t): b for t, b in bias.items()})
        assert got == hf_generate(chat_model_dir, prompt, 12, sequence_bias={(t,): b for t, b in bias.items()})
        assert plain[1] not in got
    assert changed == len(PROMPTS)           # the penalty changed both outputs on this model


def test_frequency_and_presence_penalties_equal_the_engine(client, name, chat_model_dir):
    engine = build_engine(chat_model_dir, dtype="float32", num_blocks=64, block_size=16)
    bias = ((7, 1.5),)                         # makes PROMPTS[1] repeat token 7 (see above)
    for kw in ({"frequency_penalty": 0.3}, {"presence_penalty": 0.6}, {"frequency_penalty": -0.5,
                                                                        "presence_penalty": 1.0}):
        params = SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False, logit_bias=bias, **kw)
        ref = engine.generate(PROMPTS, params)
        if kw.get("frequency_penalty", 0) >= 0:
            assert ref[1].token_ids.count(7) < 8, kw    # the penalty broke the run of 7s
        for prompt, out in zip(PROMPTS, ref):
            assert ids(client, name, prompt, max_tokens=16, logit_bias={"7": 1.5}, **kw) == out.token_ids, kw


def test_min_tokens_holds_back_eos(client, name):
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                  logit_bias={str(EOS): 100}, extra_body={"min_tokens": 4, "return_token_ids": True})
    tokens = r.choices[0].model_extra["token_ids"]
    assert len(tokens) == 5 and tokens[-1] == EOS and EOS not in tokens[:4]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_are_the_seeded_requests_and_stream_too(client, name, openai_cluster):
    prompt = PROMPTS[1]
    kw = dict(model=name, prompt=prompt, max_tokens=8, temperature=1.0, seed=123,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, choice in enumerate(r.choices):
        single = client.completions.create(**{**kw, "seed": 123 + i})
        assert choice.model_extra["token_ids"] == single.choices[0].model_extra["token_ids"]
        assert choice.text == single.choices[0].text
    assert len({tuple(c.model_extra["token_ids"]) for c in r.choices}) > 1
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 24

    texts = ["", "", ""]
    finished = set()
    stream = client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw)
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert texts == [c.text for c in r.choices] and finished == {0, 1, 2}
    assert usage.completion_tokens == 24

    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content      # greedy: the same
    assert_no_leaks(openai_cluster.address)


def test_best_of_returns_the_best_choice(client, name):
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=9, best_of=3,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices) == 1 and r.choices[0].logprobs is None
    scored = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=9, n=3,
                                       logprobs=0, extra_body={"ignore_eos": True})
    means = [sum(c.logprobs.token_logprobs) / 6 for c in scored.choices]
    assert r.choices[0].text == scored.choices[means.index(max(means))].text


def test_vllm_bench_payload_is_accepted(openai_cluster, name):
    """The body `vllm bench serve --backend openai` sends, plus an unknown field (ignored, named)."""
    body = {"model": name, "prompt": "hello", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
            "stream": False, "ignore_eos": True, "top_k": -1, "min_p": 0.0, "skip_special_tokens": True,
            "my_extra": {"x": 1}}
    status, answer = http(openai_cluster.http_address, "/v1/completions", body)
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("kw, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"n": 17}, "n"), ({"n": 3, "best_of": 2}, "best_of"), ({"extra_body": {"min_p": 2}}, "min_p"),
    ({"extra_body": {"min_tokens": 50}}, "min_tokens"),
    ({"extra_body": {"include_stop_str_in_output": True}}, "include_stop_str_in_output"),
])
def test_bad_values_are_400s_naming_the_field(client, name, openai_cluster, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="a", max_tokens=8, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert "Traceback" not in e.value.body["message"]


def test_grpc_carries_the_same_fields(openai_cluster):
    """The SDK's penalty arguments and the proto's n: two choices on one stream, each message with
    its choice and a per-choice index; choice 1 of seed s is the one-choice request with seed s + 1."""
    import grpc

    from tandem import Client
    from tandem.v1 import serving_pb2, serving_pb2_grpc

    prompt = PROMPTS[1]
    with Client(openai_cluster.address) as c:
        plain = c.complete(token_ids=prompt, max_tokens=10, temperature=0.0, ignore_eos=True).token_ids
        biased = c.complete(token_ids=prompt, max_tokens=10, temperature=0.0, ignore_eos=True,
                            logit_bias={plain[0]: -100.0}, presence_penalty=1.0, repetition_penalty=1.3)
        assert biased.token_ids[0] != plain[0]
        single = c.complete(token_ids=prompt, max_tokens=6, temperature=1.0, seed=41, ignore_eos=True).token_ids
    with grpc.insecure_channel(openai_cluster.address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        request = serving_pb2.GenerateRequest(prompt_token_ids=prompt, params=serving_pb2.SamplingParams(
            max_tokens=6, temperature=1.0, seed=40, ignore_eos=True, n=2))
        tokens: dict[int, list[int]] = {0: [], 1: []}
        for m in stub.Generate(request, timeout=120):
            assert m.index == len(tokens[m.choice])
            tokens[m.choice] += m.token_ids
        assert tokens[1] == single and len(tokens[0]) == 6
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.Generate(serving_pb2.GenerateRequest(
                prompt_token_ids=prompt, params=serving_pb2.SamplingParams(max_tokens=6, frequency_penalty=5.0)),
                timeout=60)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "frequency_penalty" in e.value.details()
    assert_no_leaks(openai_cluster.address)
