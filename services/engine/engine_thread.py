"""Runs an LLMEngine on its own thread; callers talk to it through thread-safe queues.

Callers (the gRPC servicer later, tests now) never touch the engine directly: `submit` returns a
RequestStream that yields RequestOutput deltas until the request finishes; `abort` reaches the
engine on its next loop turn. Errors inside a step fail every live stream instead of hanging it.

Build the engine ON its thread (`EngineThread(factory)`) on a CPU with several torch threads, and
leave every other thread serial (`serial_torch_elsewhere()`). libgomp, torch's OpenMP, keeps one
thread team per thread that ever ran a parallel region, and once the threads of all teams outnumber
the process's CPUs its workers stop spinning between parallel regions (a ~100-spin throttle
instead of ~3 ms) and sleep: every one of a step's ~40 parallel regions then starts with a futex
wake-up. Measured on `small`, bf16, 2 Zen 4 threads, decode at batch 1 with a 512-token context:
7.8 ms per step on the thread that loaded the model, 12.1 ms on another thread (ms, median of 768).
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch

from services.engine import attention_ops
from services.engine.engine import LLMEngine, RequestOutput
from services.engine.request import FinishReason
from services.engine.sampling_params import SamplingParams
from services.engine.step_rates import StepRates
from tandem.v1 import worker_pb2

_CLOSE = object()
log = logging.getLogger("tandem.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or an internal error) before the request finished."""


class RequestStream:
    """Iterate for RequestOutput deltas; the last one has finished=True. Closing early aborts."""

    # Streams read on an asyncio loop name it here and take items in `_put_now` on that loop: the
    # engine thread then hands a step's outputs for all of them over in one call (one wake-up).
    loop = None

    def __init__(self, owner: "EngineThread", request_id: str):
        self.request_id, self._owner = request_id, owner
        self._queue: queue.Queue = queue.Queue()
        self.finished = False

    def _put(self, item) -> None:
        self._queue.put(item)

    def _put_now(self, item) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[RequestOutput]:
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, ValueError):       # the engine refused this request
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(str(item)) from item
                yield item
                if item.finished:
                    self.finished = True
                    return
        finally:
            if not self.finished:
                self._owner.abort(self.request_id)

    def result(self) -> RequestOutput:
        last = None
        for last in self:
            pass
        return last


OS_THREAD_NAME = "tandem-engine"     # the engine thread's name in top, ps -L and /proc (its OpenMP workers inherit it)


def _hand_over(items: list) -> None:
    """On a stream's event loop: the engine's outputs of one step, in order."""
    for stream, item in items:
        stream._put_now(item)


def _name_os_thread(name: str) -> None:
    """Name the calling thread in the OS (Linux prctl PR_SET_NAME, 15 bytes), so that tools and the
    kernel's scheduler views tell the engine's threads (this one and the OpenMP team it starts next)
    from the serving threads. A no-op where prctl is unavailable."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serial_torch_elsewhere() -> None:
    """Make threads other than the engine's run torch ops serially: call on the main thread once the
    engine thread has built its engine. torch.set_num_threads(1) here is this thread's setting and
    the default of every thread that first touches torch later (asyncio.to_thread's pool, the KV
    transport's threads); the engine thread keeps its own. No second OpenMP team then appears."""
    torch.set_num_threads(1)


class EngineThread:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], name: str = "tandem-engine"):
        """engine: a built LLMEngine, or a factory the new thread calls first, so that the engine's
        weights are loaded and its OpenMP team created on the thread that steps it (module doc).
        Waits for the engine; a factory's exception is raised here (and no thread is left)."""
        self._rates = StepRates()
        # Called on the engine thread after each step that computed tokens, with (seconds, prefill
        # tokens, decoded requests); it must be quick and must not raise (the worker's metrics).
        self.on_step = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ids = itertools.count()
        factory = engine if not hasattr(engine, "step") else (lambda: engine)
        ready, failed = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(factory, ready, failed), name=name, daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            raise failed[0]

    def _run(self, factory: Callable[[], LLMEngine], ready: threading.Event, failed: list) -> None:
        """The thread: get the engine, settle its torch threads, then run the loop."""
        _name_os_thread(OS_THREAD_NAME)
        try:
            engine = factory()
            # Settle this thread's count and its OpenMP team now, before serial_torch_elsewhere()
            # changes the default: torch reads it lazily, and a thread whose first parallel region
            # came after that change was measured running serially.
            torch.set_num_threads(torch.get_num_threads())
            torch.ones(1 << 20).sum()
            attention_ops.settle_threads_here()
            self.engine = engine
            self.load = worker_pb2.LoadReport(total_blocks=engine.kv.num_blocks, free_blocks=engine.kv.num_free_blocks)
        except BaseException as e:      # noqa: BLE001 - handed to the constructor's caller
            failed.append(e)
            return
        finally:
            ready.set()
        log.info("%s: engine thread running, %d torch threads", self._thread.name, torch.get_num_threads())
        self._loop()

    def submit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None = None, priority: int = 0,
               stream_cls: type[RequestStream] | None = None, validated: bool = False,
               handoff: bool | None = None, predicted_output_tokens: int = 0) -> RequestStream:
        """Validate now (raises InvalidRequestError in the caller's thread), queue for the engine.
        handoff, predicted_output_tokens: as LLMEngine.add_request (None: the engine's role decides).

        A refusal only the engine thread can see (e.g. an id still held by a handed-off request)
        is raised from the stream's iterator as ValueError; other streams are unaffected.
        """
        if not validated:        # validated=True: the caller checked (a worker, after the router)
            self.engine.validate_new_request(prompt_token_ids, params)
        stream = self._new_stream(request_id or f"req-{next(self._ids)}", stream_cls)
        request_id = stream.request_id
        self._inbox.put(("add", (prompt_token_ids, params, request_id, priority, handoff, predicted_output_tokens)))
        return stream

    def adopt(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
              params: SamplingParams, priority: int = 0, output_logprobs: list[float] | None = None,
              stream_cls: type[RequestStream] | None = None, recompute: bool = False) -> RequestStream:
        """Queue LLMEngine.adopt for a reserved request whose KV has arrived; returns its stream.

        Any thread may call this (the KV receiver does). A refusal (e.g. the reservation is
        gone) is raised from the stream's iterator; the engine frees the blocks in that case.
        """
        stream = self._new_stream(request_id, stream_cls)
        self._inbox.put(("adopt", (request_id, prompt_token_ids, output_token_ids, params, priority,
                                   output_logprobs, recompute)))
        return stream

    def _new_stream(self, request_id: str, stream_cls: type[RequestStream] | None) -> RequestStream:
        with self._lock:
            if self._stopped.is_set():
                raise EngineDeadError("the engine thread has stopped")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running; use a unique id")
            stream = (stream_cls or RequestStream)(self, request_id)
            self._streams[request_id] = stream
        return stream

    def hand_off(self, request_id: str, timeout: float | None = 30.0):
        """LLMEngine.hand_off on the engine thread; the returned final output (or None) also ends the
        request's stream. Raises like call()."""
        def fn(engine: LLMEngine):
            out = engine.hand_off(request_id)
            if out is not None:
                self._deliver(out)
            return out
        return self.call(fn, timeout)

    def abort(self, request_id: str) -> None:
        """Ask the engine to abort; a safe no-op for unknown or finished requests."""
        self._inbox.put(("abort", request_id))

    def call(self, fn, timeout: float | None = 30.0):
        """Run fn(engine) on the engine thread between steps and return its result.

        Raises EngineDeadError at once when the thread has stopped (or stops before running fn),
        queue.Empty when fn did not run within `timeout`, and whatever fn raised.
        """
        done: queue.Queue = queue.Queue(maxsize=1)
        self.call_soon(fn, lambda ok, value: done.put((ok, value)))
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def call_soon(self, fn, on_done=None) -> None:
        """Queue fn(engine) to run on the engine thread between steps; do not wait for it.

        on_done(ok, result or exception) runs on the engine thread right after fn, or with
        EngineDeadError when the thread stops first; it must be quick and must not raise. Without
        on_done an exception of fn is logged. Raises EngineDeadError at once when the thread has
        stopped."""
        with self._lock:         # the loop drains pending calls after setting _stopped under this lock
            if self._stopped.is_set():
                raise EngineDeadError("the engine thread has stopped")
            self._inbox.put(("call", (fn, on_done or _log_failure)))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; live streams end with EngineDeadError. Idempotent."""
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self.engine.runner.bind_thread()     # the engine's GPU is this thread's current CUDA device
            while True:
                block = not self.engine.has_schedulable()
                if not self._drain_inbox(block):
                    break
                t0 = time.perf_counter()
                outputs = self.engine.step()
                self._measure(time.perf_counter() - t0)
                self._deliver_step(outputs)
            error: BaseException = EngineDeadError("engine stopped")
        except BaseException as e:     # fail the streams, never leave a caller hanging
            error = e
        with self._lock:
            self._stopped.set()
            streams, self._streams = list(self._streams.values()), {}
        for request_id in list(self.engine.scheduler.requests):
            self.engine.abort_request(request_id)
        for s in streams:
            s._put(error)
        self._fail_pending_calls()

    def _measure(self, step_s: float) -> None:
        """Refresh `load`; the last step's duration feeds the moving averages."""
        engine, sched = self.engine, self.engine.scheduler
        last = engine.last_step_prefill_tokens
        if (last or engine.last_step_decodes) and self.on_step is not None:
            self.on_step(step_s, last, engine.last_step_decodes)
        self._rates.observe(step_s, last, engine.last_step_decodes)
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        queued += sum(r.num_tokens - r.num_computed_tokens for r in sched.running if r.num_output_tokens == 0)
        kv = engine.kv
        high = [r for r in sched.running if r.priority > 0]
        head = min(sched.waiting, key=sched.policy.key, default=None)     # the next one admission takes
        head_blocks = kv.blocks_needed(head.request_id, head.num_tokens + 1) if head else 0
        paused = len(sched.paused)
        # The engine's fields of the load record (services/load.py), a new message each turn: readers
        # on other threads take the reference and never see one half-written.
        self.load = worker_pb2.LoadReport(
            total_blocks=kv.num_blocks, free_blocks=kv.num_free_blocks, running=len(sched.running) + paused,
            paused=paused, waiting=len(sched.waiting), queued_prefill_tokens=queued, step_time_ms=self._rates.step_ms,
            decode_step_time_ms=self._rates.decode_step_ms,
            prefill_tokens_per_s=self._rates.prefill_tokens_per_s, high_priority_running=len(high),
            high_priority_blocks=sum(len(kv.block_table(r.request_id)) for r in high), head_waiting_blocks=head_blocks,
            max_num_seqs=sched.config.max_num_seqs)

    def _fail_pending_calls(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                arg[1](False, EngineDeadError("the engine thread has stopped"))

    def _drain_inbox(self, block: bool) -> bool:
        while True:
            try:
                kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                ids, params, request_id, priority, handoff, predicted = arg
                try:
                    self.engine.add_request(ids, params, request_id=request_id, priority=priority, validated=True,
                                            handoff=handoff, predicted_output_tokens=predicted)
                except ValueError as e:          # refuse this request only; the engine lives on
                    with self._lock:
                        stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream._put(e)
            elif kind == "adopt":
                request_id, prompt, outputs, params, priority, logprobs, recompute = arg
                try:
                    self.engine.adopt(request_id, prompt, outputs, params, priority, logprobs, recompute)
                except (ValueError, RuntimeError) as e:     # refuse this request only
                    with self._lock:
                        stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream._put(e if isinstance(e, ValueError) else ValueError(str(e)))
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._deliver(out)
            elif kind == "call":
                fn, done = arg
                try:
                    result = fn(self.engine)
                except Exception as e:
                    done(False, e)
                else:
                    done(True, result)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams; those read on an event loop get theirs in one
        call_soon_threadsafe per loop instead of one per stream."""
        by_loop: dict = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if stream is None:
                    continue
                if stream.loop is None:
                    stream._put(out)
                else:
                    by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, items)
            except RuntimeError:          # the loop closed (its server stopped): nobody reads these
                pass

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
        if stream is not None:
            stream._put(out)


def _log_failure(ok: bool, value) -> None:
    if not ok and not isinstance(value, EngineDeadError):
        log.error("an engine call failed: %r", value)


def is_aborted(out: RequestOutput) -> bool:
    return out.finish_reason == FinishReason.ABORT
