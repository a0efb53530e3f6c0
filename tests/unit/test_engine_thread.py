"""EngineThread: concurrent submits, early close aborts, validation in the caller, shutdown and
step errors end live streams instead of hanging them."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from services.engine.builder import build_engine
from services.engine.engine_thread import EngineDeadError, EngineThread, is_aborted
from services.engine.loader import resolve_model
from services.engine.request import FinishReason
from services.engine.sampling_params import InvalidRequestError, SamplingParams
from tests.conftest import random_prompts

pytestmark = pytest.mark.timeout(60)

VOCAB = 512
LONG = SamplingParams(max_tokens=1000, ignore_eos=True)     # never finishes within a test on its own


@pytest.fixture(scope="module")
def tiny():
    return resolve_model("tiny")


def new_engine(tiny, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("num_blocks", 512)
    kw.setdefault("max_num_batched_tokens", 64)
    return build_engine("tiny", loaded=tiny, **kw)


@pytest.fixture
def make_thread(tiny):
    threads = []

    def _make(**kw) -> EngineThread:
        t = EngineThread(new_engine(tiny, **kw))
        threads.append(t)
        return t

    yield _make
    for t in threads:
        t.shutdown()
        assert not t._thread.is_alive()
        t.engine.check_integrity()
        assert t.engine.kv.num_used_blocks == 0


def idle_state(thread: EngineThread):
    """(used blocks, unfinished requests), read on the engine thread between steps."""
    return thread.call(lambda e: (e.check_integrity(), e.kv.num_used_blocks, e.has_unfinished())[1:])


def wait_for(condition, timeout_s: float = 10.0) -> None:
    """Poll until condition() is true (the engine thread publishes its load after each loop turn)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_the_load_record_follows_the_engine(make_thread):
    """EngineThread.load is the engine's part of the one load record (services/load.py)."""
    thread = make_thread()
    load = thread.load
    assert (load.total_blocks, load.free_blocks, load.running, load.waiting) == (512, 512, 0, 0)
    streams = [iter(thread.submit(p, LONG)) for p in random_prompts([40, 17], VOCAB)]
    for stream in streams:
        next(stream)                             # each has its first token: both run
    wait_for(lambda: thread.load.running == 2)
    load = thread.load
    assert load.waiting == 0 and load.paused == 0 and load.step_time_ms > 0 and load.prefill_tokens_per_s > 0
    assert load.free_blocks < 512                # both hold blocks
    for stream in streams:
        stream.close()
    wait_for(lambda: thread.load.running == 0)
    assert thread.load.free_blocks == 512


# ---------------------------------------------------------------- concurrency
def test_concurrent_submits_match_generate(make_thread, tiny):
    prompts = random_prompts([12, 40, 3, 77, 25, 9, 60, 31], VOCAB, seed=31)
    params = [SamplingParams(max_tokens=10 + 3 * i, ignore_eos=i % 2 == 0) if i % 3 else
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=i) for i in range(8)]
    reference = new_engine(tiny).generate(prompts, params)

    thread = make_thread()
    start = threading.Barrier(8)
    results: list = [None] * 8
    errors: list = []

    def client(i):
        try:
            start.wait()
            stream = thread.submit(prompts[i], params[i])
            results[i] = list(stream)
        except BaseException as e:       # surfaced below; a thread must not swallow it
            errors.append(e)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    for i, (outs, ref) in enumerate(zip(results, reference)):
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        assert final.token_ids == ref.token_ids, f"request {i}"
        assert final.finish_reason == ref.finish_reason
        assert [t for o in outs for t in o.new_token_ids] == final.token_ids
        assert "".join(o.new_text for o in outs) == final.text == ref.text
    assert idle_state(thread) == (0, False)


def test_result_returns_the_final_output(make_thread):
    thread = make_thread()
    out = thread.submit([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), request_id="mine").result()
    assert out.request_id == "mine" and out.finished and len(out.token_ids) == 4
    assert out.finish_reason == FinishReason.LENGTH and not is_aborted(out)


# ---------------------------------------------------------------- early close
@pytest.mark.parametrize("how", ["close", "break"])
def test_closing_a_stream_early_aborts_the_request(make_thread, how):
    thread = make_thread()
    stream = thread.submit(random_prompts([50], VOCAB)[0], LONG)
    if how == "close":
        it = iter(stream)
        first = next(it)
        it.close()
    else:
        for first in stream:
            break
    assert not first.finished and not stream.finished
    # the abort was queued before this call, so the engine has handled it when the call runs
    assert idle_state(thread) == (0, False)
    # the engine keeps serving
    out = thread.submit([5, 6], SamplingParams(max_tokens=3, ignore_eos=True)).result()
    assert len(out.token_ids) == 3


def test_explicit_abort_delivers_an_aborted_final_output(make_thread):
    thread = make_thread()
    stream = thread.submit(random_prompts([20], VOCAB)[0], LONG, request_id="a")
    it = iter(stream)
    next(it)
    thread.abort("a")
    thread.abort("unknown")                 # no-op
    rest = list(it)
    assert rest[-1].finished and is_aborted(rest[-1]) and stream.finished
    assert len(rest[-1].token_ids) < 1000
    assert idle_state(thread) == (0, False)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("prompt,params,field", [
    ([], SamplingParams(), "prompt"),
    ([5, VOCAB], SamplingParams(), "token_ids"),
    ([5], SamplingParams(top_p=0.0), "top_p"),
    ([5], SamplingParams(max_tokens=0), "max_tokens"),
])
def test_submit_with_bad_input_raises_in_the_caller(make_thread, prompt, params, field):
    thread = make_thread()
    with pytest.raises(InvalidRequestError) as e:
        thread.submit(prompt, params)
    assert e.value.field == field
    assert idle_state(thread) == (0, False)
    assert len(thread.submit([5, 6], SamplingParams(max_tokens=2, ignore_eos=True)).result().token_ids) == 2


def test_duplicate_live_request_id_raises_in_the_caller(make_thread):
    thread = make_thread()
    stream = thread.submit([5, 6], LONG, request_id="dup")
    with pytest.raises(ValueError, match="dup"):
        thread.submit([7, 8], LONG, request_id="dup")
    thread.abort("dup")
    assert is_aborted(stream.result())


# ---------------------------------------------------------------- shutdown and errors
def test_shutdown_ends_live_streams_with_engine_dead_error(make_thread):
    thread = make_thread()
    running = thread.submit(random_prompts([30], VOCAB)[0], LONG)
    it = iter(running)
    assert not next(it).finished                     # running and mid-decode
    # hold the engine between steps so "stop" is handled while the request is surely unfinished
    entered, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=thread.call, args=(lambda e: (entered.set(), gate.wait(30)),))
    holder.start()
    assert entered.wait(30)
    queued = thread.submit([5, 6, 7], LONG)          # accepted but never scheduled
    thread.shutdown(timeout=0)                       # queues "stop" behind the held call
    gate.set()
    holder.join()
    thread.shutdown()                                # idempotent; joins the loop
    assert not thread._thread.is_alive()
    with pytest.raises(EngineDeadError):
        for _ in it:
            pass
    with pytest.raises(EngineDeadError):
        queued.result()
    assert thread.engine.kv.num_used_blocks == 0 and not thread.engine.has_unfinished()
    with pytest.raises(EngineDeadError):
        thread.submit([5], SamplingParams())


def test_error_inside_a_step_fails_live_streams(make_thread):
    thread = make_thread()

    def broken_execute(out, on_layer_done=None):
        raise RuntimeError("kernel exploded")

    thread.call(lambda e: setattr(e.runner, "execute", broken_execute))   # runs only when work is scheduled
    stream = thread.submit([5, 6, 7], SamplingParams(max_tokens=3))
    with pytest.raises(EngineDeadError, match="kernel exploded") as e:
        stream.result()
    assert isinstance(e.value.__cause__, RuntimeError)
    thread.shutdown()
    with pytest.raises(EngineDeadError):
        thread.submit([5], SamplingParams())


def test_submit_racing_shutdown_never_leaves_a_hanging_stream(make_thread):
    thread = make_thread()
    validate = thread.engine.validate

    def validate_then_stop(ids, params):
        validate(ids, params)
        thread.shutdown()     # the loop exits after submit checked _stopped, before it registers the stream

    thread.engine.validate = validate_then_stop
    try:
        stream = thread.submit([5, 6], SamplingParams(max_tokens=2))
    except EngineDeadError:
        return
    assert not thread._thread.is_alive()
    # nothing can deliver to this stream any more: unless it already holds its end, iterating hangs
    assert not stream._queue.empty(), "stream would block forever"
    with pytest.raises(EngineDeadError):
        stream.result()


def test_decode_role_refuses_prompts_in_the_caller(make_thread):
    from services.engine.config import Role

    t = make_thread(role=Role.DECODE)
    with pytest.raises(InvalidRequestError, match="decode-only"):
        t.submit([5, 6, 7], SamplingParams(max_tokens=2))
    assert t.call(lambda e: e.has_unfinished()) is False      # the thread is still alive


def test_refusal_inside_the_engine_fails_only_that_stream(make_thread):
    """A prefill-role request keeps its blocks after HANDOFF; reusing its id is refused by the
    engine thread. Only that stream sees the error; the thread serves the next request."""
    from services.engine.config import Role

    t = make_thread(role=Role.PREFILL)
    first = t.submit([5, 6, 7], SamplingParams(max_tokens=4), request_id="a").result()
    assert first.finish_reason == FinishReason.HANDOFF
    with pytest.raises(ValueError, match="already in use"):
        t.submit([8, 9], SamplingParams(max_tokens=4), request_id="a").result()
    other = t.submit([8, 9], SamplingParams(max_tokens=4), request_id="b").result()
    assert other.finish_reason == FinishReason.HANDOFF
    t.call(lambda e: (e.release("a"), e.release("b")))
    assert t.call(lambda e: e.kv.num_used_blocks) == 0


def test_call_after_shutdown_raises_at_once(make_thread):
    t = make_thread()
    t.shutdown()
    with pytest.raises(EngineDeadError):
        t.call(lambda e: 1, timeout=None)        # would block forever if it were queued


def test_a_factory_builds_the_engine_on_the_thread_that_steps_it(tiny):
    built_on = []

    def factory():
        built_on.append(threading.current_thread())
        return new_engine(tiny)
    t = EngineThread(factory, name="engine-factory-test")
    try:
        assert built_on == [t._thread]
        out = t.submit(random_prompts([5], VOCAB, seed=3)[0], SamplingParams(max_tokens=3, ignore_eos=True)).result()
        assert out.finished and len(out.token_ids) == 3
    finally:
        t.shutdown()
    assert not t._thread.is_alive() and t.engine.kv.num_used_blocks == 0


def test_a_failing_factory_raises_in_the_caller_and_leaves_no_thread():
    def factory():
        raise ValueError("no such model")
    before = {th.name for th in threading.enumerate()}
    with pytest.raises(ValueError, match="no such model"):
        EngineThread(factory, name="engine-bad-factory")
    assert "engine-bad-factory" not in {th.name for th in threading.enumerate()} - before


SERIAL_ELSEWHERE = """
import torch
from services.engine import attention_ops
from services.engine.builder import build_engine
from services.engine.engine_thread import EngineThread, serial_torch_elsewhere
from services.engine.sampling_params import SamplingParams

def factory():
    engine = build_engine("tiny", num_threads=2, num_blocks=64, block_size=8)
    attention_ops.load_kernels()
    return engine
t = EngineThread(factory)
serial_torch_elsewhere()
out = t.submit(list(range(10, 60)), SamplingParams(max_tokens=4, ignore_eos=True)).result()
print(torch.get_num_threads(), t.call(lambda e: torch.get_num_threads()), len(out.token_ids))
t.shutdown()
"""


@pytest.mark.slow          # a fresh interpreter (~4 s)
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs for a two-thread engine")
def test_other_threads_go_serial_while_the_engine_thread_keeps_its_threads():
    """After serial_torch_elsewhere() the caller runs torch serially and the engine thread keeps its
    count through its first steps (the kernel module's own lazy thread init included). A child
    process: the setting is process-wide."""
    done = subprocess.run([sys.executable, "-c", SERIAL_ELSEWHERE], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "2", "4"], done.stdout


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux's /proc")
def test_engine_thread_is_named_in_the_os(make_thread):
    """top / ps -L / py-spy tell the engine's thread from the serving threads by its OS name."""
    from services.engine.engine_thread import OS_THREAD_NAME
    t = make_thread()
    tid = t.call(lambda e: threading.get_native_id())
    with open(f"/proc/self/task/{tid}/comm") as f:
        assert f.read().strip() == OS_THREAD_NAME
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        assert f.read().strip() != OS_THREAD_NAME          # only the engine's thread
