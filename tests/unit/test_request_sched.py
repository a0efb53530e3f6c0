"""router/request/sched.py and router/request/admission.py: prediction into the worker request, who is
ahead, SLO admission decisions, learning from finished and client-closed streams; bad input."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from router.request.admission import StartRate, predicted_ttft_s, retry_after_s
from router.request.dispatch import RouteError
from router.openai_api.errors import ApiError
from router.openai_api.requests import parse_completion
from router.request.sched import RequestScheduling, SchedulingCollector, load_warm_start
from router.request.validation import build_request
from services.engine.loader import resolve_model
from services.engine.sampling_params import InvalidRequestError
from services.engine.tokenizer import Tokenizer
from tandem.v1 import serving_pb2

MODEL = resolve_model("tiny", weights=False).config
TOKENIZER = Tokenizer.byte_level(MODEL.vocab_size)


def routed(rid: str, prompt_len: int = 8, max_tokens: int = 64, priority: int = 0, hint: int = 0, slo: float = 0.0,
           arrival: float | None = None):
    req = serving_pb2.GenerateRequest(request_id=rid, prompt_token_ids=[5] * prompt_len, priority=priority,
                                      params=serving_pb2.SamplingParams(max_tokens=max_tokens),
                                      expected_output_tokens=hint)
    if slo:
        req.slo.ttft_s = slo
    return build_request(req, MODEL, TOKENIZER, None, arrival)


async def chunks(n: int, finish=serving_pb2.FINISH_REASON_LENGTH):
    for i in range(n):
        yield serving_pb2.GenerateResponse(index=i, token_ids=[9], finished=i == n - 1,
                                           finish_reason=finish if i == n - 1 else 0)


def drain(agen, limit=None):
    async def go():
        got = []
        async for m in agen:
            got.append(m)
            if limit is not None and len(got) == limit:
                break
        await agen.aclose()
        return got
    return asyncio.run(go())


def test_expected_output_tokens_is_validated_at_the_edge():
    assert routed("a", hint=10).expected_output_tokens == 10
    with pytest.raises(InvalidRequestError, match=r"expected_output_tokens: -1 is not in \[1, max_tokens \(64\)\]"):
        routed("a", hint=-1)
    with pytest.raises(InvalidRequestError, match="expected_output_tokens: 65"):
        routed("a", hint=65)
    parsed = parse_completion({"prompt": [5, 6], "max_tokens": 8, "expected_output_tokens": 4},
                              MODEL, TOKENIZER)
    assert parsed.request.expected_output_tokens == 4
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": [5, 6], "max_tokens": 8, "expected_output_tokens": -3},
                         MODEL, TOKENIZER)
    assert e.value.status == 400 and e.value.param == "expected_output_tokens"


def test_run_predicts_into_the_worker_request_and_learns():
    s = RequestScheduling(lambda: None)
    rr = routed("a", max_tokens=64)
    assert len(drain(s.run(rr, chunks(5)))) == 5
    assert rr.worker_request.predicted_output_tokens == 32            # the prior: max_tokens / 2
    assert s.predictor.observations == 1 and len(s.error) == 1 and not s.not_started
    closed = routed("b")
    drain(s.run(closed, chunks(50)), limit=7)                         # the client stops reading after 7
    assert s.predictor.observations == 2 and [a for *_, a in s.error._pairs] == [5, 7]
    aborted = routed("c")
    drain(s.run(aborted, chunks(3, serving_pb2.FINISH_REASON_ABORT)))
    assert s.predictor.observations == 2                              # an abort teaches nothing

    async def failing():
        yield serving_pb2.GenerateResponse(index=0, token_ids=[1])
        raise RouteError(grpc.StatusCode.UNAVAILABLE, "gone")
    with pytest.raises(RouteError):
        drain(s.run(routed("d"), failing()))
    assert s.predictor.observations == 2 and not s.not_started
    names = {m.name for m in SchedulingCollector(s).collect()}
    assert {"tandem_predictor_mae_tokens", "tandem_predictor_spearman", "tandem_admission_refused"} <= names


def test_ahead_follows_the_queue_policy():
    for policy, expected in (("fcfs", 2), ("sjf", 0)):
        s = RequestScheduling(lambda: None, queue_policy=policy)
        for rid, n in (("long1", 60), ("long2", 50)):
            r = routed(rid, max_tokens=n, arrival=1.0)
            s.predict(r)
            s.not_started[rid] = r
        short = routed("short", max_tokens=4, arrival=2.0)
        s.predict(short)
        assert s.ahead(short, now=2.0) == expected, policy


def test_slo_admission_decisions():
    s = RequestScheduling(lambda: 1000.0, admission="slo", slo_ttft_s=1.0)
    s.admit(routed("free"), now=0.0)                    # nothing ahead: admitted
    for i in range(4):
        r = routed(f"q{i}", arrival=0.01)
        s.predict(r)
        s.not_started[r.request_id] = r
    s.admit(routed("unmeasured", arrival=0.1), now=0.1)  # a backlog but no start rate yet: admitted
    for t in range(6):
        s.start_rate.started(t * 0.5, backlog=3)          # 2 starts per second
    with pytest.raises(RouteError) as refused:            # 4 ahead / 2 per s = 2 s > 1 s
        s.admit(routed("late", arrival=3.0), now=3.0)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.retry_after_s == 2
    assert "retry after 2 s" in refused.value.message and s.refused["slo"] == 1
    s.admit(routed("patient", slo=5.0, arrival=3.0), now=3.0)      # its own SLO is looser
    with pytest.raises(RouteError) as bad:                          # 500 tokens at 1000/s > 0.1 s
        s.admit(routed("hopeless", prompt_len=500, slo=0.1), now=3.0)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and bad.value.message.startswith("slo.ttft_s:")
    RequestScheduling(lambda: 1000.0, admission="none").admit(routed("x", prompt_len=500, slo=0.1))


def test_start_rate_counts_only_gaps_with_a_backlog():
    r = StartRate()
    r.started(0.0, backlog=0)
    r.started(100.0, backlog=2)          # the gap before had no backlog: not counted
    for t in (100.5, 101.0, 101.5, 102.0):
        r.started(t, backlog=1)
    assert r.rate() == pytest.approx(2.0)
    assert predicted_ttft_s(4, 2.0, 100, 1000.0) == pytest.approx(2.1)
    assert predicted_ttft_s(4, None, 100, None) == 0.0
    assert retry_after_s(2.1, 2.0) == 1 and retry_after_s(5.5, 2.0) == 4


def test_warm_start_file_errors_name_the_flag(tmp_path):
    s = RequestScheduling(lambda: None)
    f = tmp_path / "w.jsonl"
    f.write_text('{"prompt_token_ids": [1, 2, 3], "output_tokens": 4}\nnot json\n')
    with pytest.raises(ValueError, match=r"--predictor-warm-start .*w\.jsonl, line 2"):
        load_warm_start(s.predictor, str(f))
    assert load_warm_start(s.predictor, None) == 0


def test_a_client_that_goes_away_mid_stream_teaches_what_it_received():
    """The gRPC handler task is cancelled while it awaits the next message (the client closed its
    call): the tokens it got count, as for a closed stream."""
    s = RequestScheduling(lambda: None)

    async def slow():
        for i in range(3):
            yield serving_pb2.GenerateResponse(index=i, token_ids=[9])
        await asyncio.Event().wait()          # the next token never comes

    async def go():
        got = []

        async def consume():
            async for m in s.run(routed("gone"), slow()):
                got.append(m)
        task = asyncio.ensure_future(consume())
        while len(got) < 3:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(go())
    assert s.predictor.observations == 1 and [a for *_, a in s.error._pairs] == [3]


def test_queue_bound_refuses_with_the_flag_and_a_retry_after_in_any_admission_mode():
    for admission in ("none", "slo"):
        s = RequestScheduling(lambda: None, admission=admission, max_queued=3, slo_ttft_s=600.0, max_queue_wait_s=0)
        for i in range(3):
            r = routed(f"q{i}")
            s.admit(r)                                     # room: admitted
            s.not_started[r.request_id] = r
        with pytest.raises(RouteError) as full:
            s.admit(routed("one-too-many"))
        e = full.value
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.retry_after_s == 1     # no start rate: 1 s
        assert "--max-queued-requests 3" in e.message and "retry after 1 s" in e.message
        assert s.refused["queue_full"] == 1
        for t in range(6):
            s.start_rate.started(t * 2.0, backlog=3)      # 0.5 starts per second
        with pytest.raises(RouteError) as slow:
            s.admit(routed("slow"))
        assert slow.value.retry_after_s == 2               # 1 over the bound at 0.5/s
        del s.not_started["q0"]
        s.admit(routed("after-one-started"))               # below the bound again: admitted
    with pytest.raises(ValueError, match="--max-queued-requests"):
        RequestScheduling(lambda: None, max_queued=0)


def test_queue_full_refusals_are_a_metric():
    s = RequestScheduling(lambda: None, max_queued=1)
    s.not_started["x"] = routed("x")
    with pytest.raises(RouteError):
        s.admit(routed("y"))
    refused = next(m for m in SchedulingCollector(s).collect() if m.name == "tandem_admission_refused")
    assert {sample.labels["reason"]: sample.value for sample in refused.samples} == {"slo": 0, "queue_full": 1, "queue_wait": 0}


def test_a_resumed_request_skips_admission_and_learns_its_whole_length():
    """A request resumed after its router died (GenerateRequest.resume) was admitted by that router:
    a full queue does not refuse it, it is not counted as waiting, and what the client had counts."""
    s = RequestScheduling(lambda: None, max_queued=1)
    s.not_started["x"] = routed("x")
    req = serving_pb2.GenerateRequest(request_id="back", prompt_token_ids=[5] * 8,
                                      params=serving_pb2.SamplingParams(max_tokens=64),
                                      resume=serving_pb2.Resume(delivered_token_ids=[9] * 10))
    rr = build_request(req, MODEL, TOKENIZER, None)
    assert rr.resume_token_ids == [9] * 10
    with pytest.raises(RouteError):
        s.admit(routed("y"))                               # the bound holds for new requests
    assert len(drain(s.run(rr, chunks(5)))) == 5
    assert "back" not in s.not_started and s.predictor.observations == 1
    assert [a for *_, a in s.error._pairs] == [15]


@pytest.mark.parametrize("body, field", [
    ({"resume_token_ids": [1, 2]}, "request_id"),
    ({"request_id": "r", "resume_token_ids": [1] * 8}, "resume_token_ids"),
    ({"request_id": "r", "resume_token_ids": [-1]}, "resume_token_ids"),
    ({"request_id": "r", "resume_token_ids": "12"}, "resume_token_ids"),
])
def test_bad_resume_is_refused_at_the_edge_naming_the_field(body, field):
    with pytest.raises((ApiError, InvalidRequestError)) as e:
        parsed = parse_completion({"prompt": [5, 6], "max_tokens": 8, **body}, MODEL, TOKENIZER)
        build_request(parsed.request, MODEL, TOKENIZER, None)
    name = e.value.param if isinstance(e.value, ApiError) else e.value.field
    if isinstance(e.value, InvalidRequestError):
        name = parsed.rename.get(name, name)
    assert name == field


def test_resume_token_ids_reach_the_request():
    parsed = parse_completion({"prompt": [5, 6], "max_tokens": 8, "request_id": "r", "resume_token_ids": [7, 8]},
                              MODEL, TOKENIZER)
    rr = build_request(parsed.request, MODEL, TOKENIZER, None)
    assert rr.resume_token_ids == [7, 8] and rr.request_id == "r"


def test_queue_wait_bound_refuses_what_would_start_too_late_naming_the_flag():
    s = RequestScheduling(lambda: None, max_queue_wait_s=2.0)
    for t in range(6):
        s.start_rate.started(t * 0.5, backlog=3)          # 2 starts per second
    for i in range(4):                                    # 4 waiting: 2 s of starts, at the bound
        r = routed(f"w{i}")
        s.admit(r)
        s.not_started[r.request_id] = r
    s.not_started["w4"] = routed("w4")                    # 5 waiting: 2.5 s > 2 s
    with pytest.raises(RouteError) as over:
        s.admit(routed("late"))
    e = over.value
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue-wait-s 2" in e.message
    assert e.retry_after_s == 1 and s.refused["queue_wait"] == 1
    RequestScheduling(lambda: None, max_queue_wait_s=0.0)   # 0: no bound
    off = RequestScheduling(lambda: None, max_queue_wait_s=0.0)
    off.start_rate, off.not_started = s.start_rate, dict(s.not_started)
    off.admit(routed("no-bound"))
    with pytest.raises(ValueError, match="--max-queue-wait-s"):
        RequestScheduling(lambda: None, max_queue_wait_s=-1.0)


def test_start_rate_reads_batched_starts_over_time_not_over_a_count():
    """A batched prefill starts many requests within a millisecond: the rate is their count over the
    backlogged time, so bursts of 50 every 2 s read about 25/s, not thousands."""
    r = StartRate(window_s=60.0)
    t = 0.0
    for burst in range(10):
        for k in range(50):
            r.started(t + k * 1e-5, backlog=100)
        t += 2.0
    assert r.rate() == pytest.approx(25.0, rel=0.15)
    quick = StartRate()
    for k in range(50):
        quick.started(k * 1e-5, backlog=10)
    assert quick.rate() is None                     # under 20 ms of backlog: no evidence yet
    long = StartRate(window_s=10.0)
    for k in range(200):                            # 1/s for 200 s, then 4/s: the window forgets the old
        long.started(float(k), backlog=1)
    for k in range(1, 81):
        long.started(199 + k * 0.25, backlog=1)
    assert long.rate() == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("request_id", ["a" * 257, "a" * 70_000, "tab\there", "nl\n"])
def test_a_request_id_too_long_or_unprintable_is_refused_at_the_edge(request_id):
    """It names the request in the KV transport's frames (a 16-bit length) and in logs: over gRPC
    and HTTP alike, at most 256 printable characters."""
    req = serving_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=[5, 6],
                                      params=serving_pb2.SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="request_id: must be at most 256 printable characters"):
        build_request(req, MODEL, TOKENIZER, None)
    with pytest.raises(ApiError) as e:
        parse_completion({"prompt": [5, 6], "max_tokens": 4, "request_id": request_id}, MODEL, TOKENIZER)
    assert e.value.param == "request_id"
    assert build_request(serving_pb2.GenerateRequest(request_id="a" * 256, prompt_token_ids=[5, 6],
                                                     params=serving_pb2.SamplingParams(max_tokens=4)),
                         MODEL, TOKENIZER, None).request_id == "a" * 256
