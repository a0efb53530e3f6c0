"""Multi-application, multi-turn workloads (`apps:` specs): shared system prompts per application,
each application's own lengths, conversations whose turns re-send their history, determinism, and
bad specs named."""
from __future__ import annotations

from collections import defaultdict

import pytest

from loadgen import multiapp
from loadgen.workloads import WorkloadConfig, WorkloadError, build_workload

SPEC = ("apps:conversations=30,turns=uniform:2:4,think=0.5,rate=4,"
        "app=sys=64;input=uniform:8:16;output=5,app=sys=96;input=4;output=uniform:20:30;weight=2")


def build(spec=SPEC, seed=3, **kw):
    return build_workload(WorkloadConfig(trace=spec, vocab_size=1000, seed=seed, **kw))


def conversations(wl):
    """conversation → its requests in turn order (the first segment of a conversation's own
    messages identifies it)."""
    by = defaultdict(list)
    for r in wl.requests:
        by[r.segments[1][0]].append(r)
    return by


def test_turns_resend_their_history_token_for_token():
    wl = build()
    assert wl.format == "apps"
    convs = conversations(wl)
    assert len(convs) == 30
    for turns in convs.values():
        assert 2 <= len(turns) <= 4
        prompts = [wl.prompt(r) for r in turns]
        for k in range(1, len(turns)):
            prev = turns[k - 1]
            assert turns[k].arrival_s >= prev.arrival_s
            assert prompts[k][:len(prompts[k - 1])] == prompts[k - 1]          # the previous prompt, then
            assert len(prompts[k]) > len(prompts[k - 1]) + prev.output_tokens  # its answer and a new message


def test_each_app_shares_its_system_prompt_and_keeps_its_own_lengths():
    wl = build()
    by_sys = defaultdict(list)
    for r in wl.requests:
        by_sys[r.segments[0]].append(r)
    assert sorted(by_sys) == sorted(by_sys) and len(by_sys) == 2
    (sys_a, reqs_a), (sys_b, reqs_b) = sorted(by_sys.items(), key=lambda kv: kv[0][1])
    assert sys_a[1] == 64 and sys_b[1] == 96
    assert all(r.output_tokens == 5 for r in reqs_a)
    assert all(20 <= r.output_tokens <= 30 for r in reqs_b)
    assert all(8 <= r.segments[-1][1] <= 16 for r in reqs_a) and all(r.segments[-1][1] == 4 for r in reqs_b)
    first = [wl.prompt(r)[:64] for r in reqs_a] + [wl.prompt(r)[:96] for r in reqs_b]
    assert len({tuple(p) for p in first}) == 2
    assert len(reqs_b) > len(reqs_a)                                         # weight 2 vs 1 (30 conversations)


def test_same_seed_same_workload_other_seed_differs_and_clipping_keeps_prefixes():
    a, b = build(), build()
    assert a.requests == b.requests and [a.prompt(r) for r in a.requests] == [b.prompt(r) for r in b.requests]
    assert build(seed=4).requests != a.requests
    clipped = build(max_input_tokens=100)
    assert max(r.input_tokens for r in clipped.requests) == 100
    for turns in conversations(clipped).values():
        prompts = [clipped.prompt(r) for r in turns]
        for k in range(1, len(turns)):
            n = min(len(prompts[k]), len(prompts[k - 1]))
            assert prompts[k][:n] == prompts[k - 1][:n]


def test_rate_rescales_the_schedule():
    wl = build(rate=20.0)
    d = wl.describe()
    assert d["format"] == "apps" and abs(d["offered_rate_rps"] - 20.0) < 1e-6


@pytest.mark.parametrize("spec, words", [
    ("apps:conversations=3", "at least one app"),
    ("apps:app=sys=10;inptu=5", "unknown field(s) ['inptu']"),
    ("apps:app=sys=10,colour=red", "unknown item 'colour=red'"),
    ("apps:app=sys=10;weight=-1", "weight must be positive"),
    ("apps:app=sys=10,conversations=x", "conversations must be an integer"),
    ("apps:app=sys=wide", "bad length 'wide'"),
])
def test_bad_specs_are_named(spec, words):
    with pytest.raises(WorkloadError) as e:
        build(spec)
    assert words in str(e.value)


def test_generate_is_a_pure_function_of_spec_and_seed():
    spec = multiapp.ConversationSpec((multiapp.AppSpec(sys="8", input="2", output="3"),), conversations=3, turns="2")
    sampler = lambda text, rng: (lambda: int(text))                          # noqa: E731
    turns = multiapp.generate(spec, 0, sampler)
    assert [(t.conversation, t.turn, t.input_tokens, t.output_tokens) for t in sorted(
        turns, key=lambda t: (t.conversation, t.turn))] == [(c, k, 10 if k == 0 else 15, 3)
                                                            for c in range(3) for k in range(2)]
    assert turns == multiapp.generate(spec, 0, sampler)
