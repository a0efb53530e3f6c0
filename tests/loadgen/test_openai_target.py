"""The OpenAI-compatible target against a small local aiohttp server speaking streaming /v1/completions."""
from __future__ import annotations

import asyncio
import io
import json

import pytest
from aiohttp import web

from loadgen.metrics import summarize
from loadgen.runner import run
from loadgen.targets import OpenAITarget
from loadgen.workloads import WorkloadConfig, build_workload


class FakeOpenAI:
    """Streams `max_tokens` one-token events, then a usage event and [DONE].

    `reject_extras`: answer 400 to bodies with ignore_eos (as a strict server would).
    `fail_after`: send an error event after that many tokens. `tokens_per_event` > 1: events carry
    several tokens and only the usage says how many.
    """

    def __init__(self, reject_extras=False, fail_after=None, tokens_per_event=1, text_only=False):
        self.reject_extras, self.fail_after, self.tokens_per_event = reject_extras, fail_after, tokens_per_event
        self.text_only = text_only
        self.bodies = []
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/completions", self.completions)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "vocab_size": 300}]})

    async def completions(self, request):
        body = await request.json()
        self.bodies.append(body)
        if self.reject_extras and "ignore_eos" in body:
            return web.json_response({"error": {"message": "Unrecognized request argument: ignore_eos"}}, status=400)
        if self.text_only and not isinstance(body["prompt"], str):
            return web.json_response({"error": {"message": "prompt must be a string"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = 0
        while sent < body["max_tokens"]:
            if self.fail_after is not None and sent >= self.fail_after:
                await resp.write(b'data: {"error": {"message": "engine died"}}\n\n')
                return resp
            k = min(self.tokens_per_event, body["max_tokens"] - sent)
            sent += k
            event = {"choices": [{"index": 0, "text": "x" * k, "finish_reason": None}]}
            if self.tokens_per_event > 1:
                event["usage"] = {"prompt_tokens": len(body["prompt"]), "completion_tokens": sent}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(0.005)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": sent}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _drive(server: FakeOpenAI, n=5, output=6, rate=50.0):
    async def go():
        runner = web.AppRunner(server.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            target = OpenAITarget(f"http://127.0.0.1:{port}", timeout_s=10)
            async with target:
                vocab = await target.vocab_size()
                wl = build_workload(WorkloadConfig(trace=f"synthetic:n={n},input=12,output={output}",
                                                   arrival="constant", rate=rate, vocab_size=vocab))
                results, wall = await run(wl, target, out=io.StringIO())
                return wl, target, results, wall
        finally:
            await runner.cleanup()
    return asyncio.run(go())


def test_streams_token_ids_prompt_and_counts_tokens():
    server = FakeOpenAI()
    wl, target, results, wall = _drive(server)
    assert target.model == "fake-model"
    s = summarize(results, wall=wall)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (5, 0, 30)
    assert all(len(r.events) == 6 for r in results)
    for r in results:                                     # TPOT = (t_last − t_first) / (n − 1)
        assert r.tpot_s == pytest.approx((r.events[-1][0] - r.events[0][0]) / 5)
    body = server.bodies[0]
    assert body["prompt"] == wl.prompt(wl.requests[0]) and all(3 <= t < 300 for t in body["prompt"])
    assert body["stream"] is True and body["max_tokens"] == 6 and body["model"] == "fake-model"
    assert body["ignore_eos"] is True and body["min_tokens"] == 6


def test_drops_extras_when_the_server_rejects_them():
    server = FakeOpenAI(reject_extras=True)
    _, target, results, _ = _drive(server, n=3)
    assert all(r.ok and r.output_tokens == 6 for r in results)
    assert target.describe()["ignore_eos_extras"] is False
    assert "ignore_eos" not in server.bodies[-1]


def test_sends_text_when_the_server_refuses_token_ids():
    server = FakeOpenAI(text_only=True)
    wl, target, results, _ = _drive(server, n=3, rate=10000.0)     # all three refused at once
    assert all(r.ok and r.output_tokens == 6 for r in results)
    assert target.describe()["prompt"].startswith("text")
    texts = [b["prompt"] for b in server.bodies if isinstance(b["prompt"], str)]
    assert len(texts) == 3 and all(len(t.split()) == 12 for t in texts)
    assert server.bodies[-1]["ignore_eos"] is True        # extras kept: only the prompt was refused


def test_multi_token_events_counted_from_usage():
    _, _, results, _ = _drive(FakeOpenAI(tokens_per_event=4), n=2, output=10)
    assert [[k for _, k in r.events] for r in results] == [[4, 4, 2]] * 2


def test_error_mid_stream_counts_as_failure():
    _, _, results, wall = _drive(FakeOpenAI(fail_after=2), n=3)
    s = summarize(results, wall=wall)
    assert (s["completed"], s["failed"]) == (0, 3)
    assert "engine died" in next(iter(s["errors"]))
    assert all(r.output_tokens == 2 for r in results)


def test_unreachable_server_counts_failures():
    async def go():
        target = OpenAITarget("http://127.0.0.1:1", timeout_s=5)
        async with target:
            wl = build_workload(WorkloadConfig(trace="synthetic:n=2,input=4,output=2", arrival="constant", rate=100.0,
                                               vocab_size=50))
            return await run(wl, target, out=io.StringIO())
    results, wall = asyncio.run(go())
    s = summarize(results, wall=wall)
    assert (s["completed"], s["failed"]) == (0, 2)
    assert "ClientConnectorError" in next(iter(s["errors"]))
