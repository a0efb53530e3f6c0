"""Requests no router reads (issue 18, "router death").

A Decode or Generate stream whose reader is lost before its request finished (the call was
cancelled or dropped: the router died; or the router's Outputs stream closed under it) is parked
here instead of aborted. The request keeps decoding in the engine; a task drains its engine stream
through the same token_chunks / ChunkCursor a reader uses, and the cursor keeps every chunk
(ChunkCursor.history), so that the router the client resumes on can take the request back
(Decode(request_id, start_index) without a request, rpc_decode.py) and get the tokens from
start_index on, then the live ones.

A parked request ends one way or another, and whoever ends it cancels its engine stream (a no-op
once finished) and removes its entry:
- taken back by a reader (`take`: the stream is the taker's from then on);
- dropped at once by Release (`drop`), by an engine abort (FINISH_REASON_ABORT), by an engine
  error, or by the worker stopping (`close`);
- aborted when `grace_s` seconds pass without a taker, finished in the engine or not.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.worker.async_stream import AsyncRequestStream
from services.worker.token_chunks import ChunkCursor, token_chunks
from tandem.v1 import serving_pb2

log = logging.getLogger("tandem.worker")


@dataclass(eq=False)
class Parked:
    """One parked request: its engine stream and the cursor keeping its chunks."""
    stream: AsyncRequestStream
    cursor: ChunkCursor
    since: float                            # time.monotonic() when parked
    task: asyncio.Task | None = None        # drains the stream until the grace ends
    over: bool = False                      # taken or ended: the drain task leaves the stream alone


class ParkedRequests:
    """The parked requests of a worker, by request id. Event-loop thread only."""

    def __init__(self, grace_s: float, moved: Callable | None = None):
        """grace_s: how long a parked request waits for a taker (0: parking is off); moved: where a
        request that migrated away went (MigrationSources.moved_to), as token_chunks needs it."""
        self.grace_s = grace_s
        self._moved = moved
        self._entries: dict[str, Parked] = {}
        # Ids released lately (id -> until when, monotonic): a Release that overtakes the cancel of
        # its stream (the router cancels, then releases) must not leave that stream parked after it.
        self._released: dict[str, float] = {}
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.grace_s > 0 and not self._closed

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def get(self, request_id: str) -> Parked | None:
        return self._entries.get(request_id)

    def park(self, stream: AsyncRequestStream, cursor: ChunkCursor, why: str) -> bool:
        """Keep `stream`'s request decoding with no reader, its chunks kept in `cursor`, until a taker,
        a drop or the grace's end. Precondition: nobody else reads the stream from now on (its divert
        unset). Returns False, keeping nothing, when parking is off or closed, the request finished
        (its last chunk was read), it was released here within the grace, or `cursor` keeps no
        history: the caller then cancels the stream."""
        rid = stream.request_id
        self._forget_old_releases()
        if (not self.enabled or stream.finished or cursor.history is None or rid in self._released
                or rid in self._entries):
            return False
        entry = self._entries[rid] = Parked(stream, cursor, time.monotonic())
        entry.task = asyncio.ensure_future(self._keep(entry))
        log.info("request %s: parked at output index %d (%s); kept %g s for a router to take it back",
                 rid, cursor.index, why, self.grace_s)
        return True

    async def take(self, request_id: str) -> Parked | None:
        """Unpark request_id for a new reader: its drain task stopped, its stream and cursor the
        caller's to read and to settle (park again or cancel). None when it is not parked. If the
        caller is cancelled while the task stops, the request is aborted."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        entry.over = True
        entry.task.cancel()
        try:
            await asyncio.wait([entry.task])      # it reads the stream no more: one reader at a time
        except asyncio.CancelledError:
            entry.stream.cancel()
            raise
        log.info("request %s: taken back after %.2f s parked, at output index %d", request_id,
                 time.monotonic() - entry.since, entry.cursor.index)
        return entry

    def drop(self, request_id: str, why: str) -> bool:
        """Release: abort request_id's parked request now; and for the grace period refuse to park it
        (a Release may arrive before its stream's park). Returns whether it was parked."""
        self._forget_old_releases()
        if self.grace_s > 0:
            self._released.pop(request_id, None)         # to the end: the dict stays in expiry order
            self._released[request_id] = time.monotonic() + self.grace_s
        entry = self._entries.get(request_id)
        if entry is None:
            return False
        self._end(entry, why)
        return True

    def close(self, why: str = "the instance is stopping") -> None:
        """Abort every parked request and park none from now on. Idempotent."""
        self._closed = True
        for entry in list(self._entries.values()):
            self._end(entry, why)

    def mark(self, requests) -> None:
        """Stats(list_requests): set `parked` on the listed RunningRequests (a repeated field) that are
        parked, and add those the engine no longer runs (finished while parked, their chunks kept):
        running False, num_output_tokens the output tokens there are."""
        listed = set()
        for r in requests:
            if r.request_id in self._entries:
                r.parked = True
                listed.add(r.request_id)
        for rid, entry in self._entries.items():
            if rid not in listed:
                history = entry.cursor.history
                prompt = history[-1].num_prompt_tokens if history and history[-1].finished else 0
                requests.add(request_id=rid, num_tokens=prompt + entry.cursor.index,
                             num_output_tokens=entry.cursor.index, running=False, parked=True)

    async def _keep(self, entry: Parked) -> None:
        """The drain task: read the stream (the cursor keeps the chunks) until the grace ends; end
        the entry at once on an abort or an engine error."""
        why = f"no router took it back within the orphan grace of {self.grace_s:g} s"
        try:
            async with asyncio.timeout(self.grace_s):
                async for chunk in token_chunks(entry.stream, entry.cursor, _NO_READER, self._moved):
                    if chunk.finished and chunk.finish_reason == serving_pb2.FINISH_REASON_ABORT:
                        why = "it was aborted in the engine"
                        return
                await asyncio.get_running_loop().create_future()     # finished: kept till the grace ends
        except TimeoutError:
            pass
        except _StreamFailed as e:
            why = str(e)
        finally:
            self._end(entry, why)

    def _end(self, entry: Parked, why: str) -> None:
        """Abort the request in the engine and forget it; a no-op once taken or ended."""
        if entry.over:
            return
        entry.over = True
        rid = entry.stream.request_id
        if self._entries.get(rid) is entry:
            del self._entries[rid]
        entry.stream.cancel()
        if entry.task is not None and entry.task is not asyncio.current_task():
            entry.task.cancel()
        log.info("request %s: parked request dropped after %.2f s: %s", rid, time.monotonic() - entry.since, why)

    def _forget_old_releases(self) -> None:
        # Every mark lasts grace_s, so insertion order is expiry order: the expired ones lead.
        now = time.monotonic()
        while self._released:
            rid, until = next(iter(self._released.items()))
            if until > now:
                return
            del self._released[rid]


class _StreamFailed(Exception):
    """token_chunks aborted the parked stream (an engine error): what it would tell a reader."""


class _NoReader:
    """The context token_chunks reads while a request is parked: an abort ends the entry."""

    async def abort(self, code, details: str):
        raise _StreamFailed(f"{code.name}: {details}")


_NO_READER = _NoReader()
