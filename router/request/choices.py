"""n choices and best_of of one prompt, for both front doors (gRPC Generate and the OpenAI API).

A request with n > 1 (or best_of > 1) runs as best_of child requests through the cluster, each a
RoutedRequest of its own (placement, migration, re-dispatch and release work per child as for
any request). Child i is named `<request_id>#c<i>`; a seeded request gives child i the seed
seed + i, so every choice is reproducible and the choices differ. The prompt's KV is computed
once: the children go to the prefill instance together and its scheduler lets one compute the
prompt while its twins wait, then attach the cached blocks (services/engine/scheduler.py,
_twin_key) and compute only the last partial block.

The parent RoutedRequest stays in router.live, so Abort by the client's id reaches every child.
`merged` interleaves the children's messages as they come, each marked with its choice (its
`index` counts that choice's tokens). With best_of > n, `best_of_stream` waits for all children
and passes on the n with the highest mean token logprob, renumbered 0..n-1 (OpenAI's rule: best_of
is not streamed; the OpenAI API refuses stream with best_of > n).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from router.request.dispatch import RoutedRequest
from services.engine.sampling_params import InvalidRequestError
from tandem.v1 import serving_pb2, worker_pb2

MAX_CHOICES = 16           # the most children (n or best_of) one request may ask for
_SEED_MOD = 2 ** 64


def check_choices(params: serving_pb2.SamplingParams) -> tuple[int, int]:
    """(n, best_of) of `params` (0 means 1; best_of defaults to n). Raises InvalidRequestError
    naming the field when n or best_of is above MAX_CHOICES or best_of < n."""
    n = params.n or 1
    best_of = params.best_of or n
    if n > MAX_CHOICES:
        raise InvalidRequestError("n", f"{n} choices asked; this cluster allows at most {MAX_CHOICES} per request")
    if best_of > MAX_CHOICES:
        raise InvalidRequestError("best_of", f"{best_of} asked; this cluster allows at most {MAX_CHOICES}")
    if best_of < n:
        raise InvalidRequestError("best_of", f"must be >= n ({n}), got {best_of}")
    return n, best_of


class _Children:
    """Stands in the parent's `calls`: the Abort RPC's rr.abort() cancels every child."""

    def __init__(self, children: list[RoutedRequest]):
        self.children = children

    def cancel(self) -> None:
        for child in self.children:
            child.abort()


def split(rr: RoutedRequest) -> list[RoutedRequest]:
    """The child requests of rr (best_of of them); [rr] itself for a one-choice request."""
    n, best_of = check_choices(rr.worker_request.params)
    if best_of == 1:
        return [rr]
    children = []
    for i in range(best_of):
        wr = worker_pb2.WorkerRequest()
        wr.CopyFrom(rr.worker_request)
        wr.request_id = f"{rr.request_id}#c{i}"
        wr.params.n = wr.params.best_of = 0
        if wr.params.HasField("seed"):
            wr.params.seed = (wr.params.seed + i) % _SEED_MOD
        if best_of > n and not wr.params.HasField("logprobs"):
            wr.params.logprobs = 0                 # ranking needs each token's logprob
        params = rr.params
        if wr.params.HasField("seed") or wr.params.HasField("logprobs"):
            params = replace(params, seed=wr.params.seed if wr.params.HasField("seed") else None,
                             logprobs=wr.params.logprobs if wr.params.HasField("logprobs") else None)
        children.append(RoutedRequest(wr.request_id, rr.prompt_token_ids, params, wr, rr.arrival, rr.timeout))
    rr.calls.append(_Children(children))
    return children


def stream(rr: RoutedRequest, run: Callable[[RoutedRequest], AsyncIterator[serving_pb2.GenerateResponse]],
           keep_logprobs: bool) -> AsyncIterator[serving_pb2.GenerateResponse]:
    """The client's messages for rr: run(rr) itself for one choice (no layer in between: every
    token passes here), else its children's `merged`, ranked by `best_of_stream` when best_of > n.
    Raises InvalidRequestError as check_choices."""
    n, best_of = check_choices(rr.worker_request.params)
    children = split(rr)
    if len(children) == 1:
        return run(children[0])
    return best_of_stream(merged(children, run), n, best_of, keep_logprobs)


async def merged(children: list[RoutedRequest],
                 run: Callable[[RoutedRequest], AsyncIterator[serving_pb2.GenerateResponse]]
                 ) -> AsyncIterator[serving_pb2.GenerateResponse]:
    """Every child's messages (run(child) streams them), interleaved as they arrive, each with
    `choice` set to the child's position. Ends when all children have finished; the first error
    of any child (CancelledError of an aborted one included) is raised and the others are
    cancelled, which releases what they hold."""
    if len(children) == 1:
        async with contextlib.aclosing(run(children[0])) as stream:
            async for message in stream:
                yield message
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, child: RoutedRequest) -> None:
        try:
            async with contextlib.aclosing(run(child)) as stream:
                async for message in stream:
                    message.choice = i
                    queue.put_nowait((message, None))
        except BaseException as e:          # noqa: BLE001 -- handed to the reader, which raises it
            queue.put_nowait((None, e))
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        queue.put_nowait((None, None))

    tasks = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(children)]
    try:
        running = len(tasks)
        while running:
            message, error = await queue.get()
            if error is not None:
                raise error
            if message is None:
                running -= 1
                continue
            yield message
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def best_of_stream(stream: AsyncIterator[serving_pb2.GenerateResponse], n: int, best_of: int,
                         keep_logprobs: bool) -> AsyncIterator[serving_pb2.GenerateResponse]:
    """`stream` (merged) when best_of == n; otherwise every message is held until all best_of
    choices finished, then the n best (highest mean token logprob; the lower choice first among
    equals) are passed on as choices 0..n-1 in that order. keep_logprobs False: the logprobs asked
    only for ranking are dropped."""
    if best_of == n:
        async with contextlib.aclosing(stream) as s:
            async for message in s:
                yield message
        return
    held: dict[int, list[serving_pb2.GenerateResponse]] = {i: [] for i in range(best_of)}
    async with contextlib.aclosing(stream) as s:
        async for message in s:
            held[message.choice].append(message)

    def mean_logprob(i: int) -> float:
        lps = [lp for m in held[i] for lp in m.logprobs if lp == lp]
        return sum(lps) / len(lps) if lps else float("-inf")

    ranked = sorted(range(best_of), key=lambda i: (-mean_logprob(i), i))[:n]
    for new, old in enumerate(ranked):
        for message in held[old]:
            message.choice = new
            if not keep_logprobs:
                del message.logprobs[:]
                del message.top_logprobs[:]
            yield message
