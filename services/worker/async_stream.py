"""Bridges an engine-thread RequestStream into asyncio without a thread per stream."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.engine.engine import RequestOutput
from services.engine.engine_thread import EngineDeadError, RequestStream


class AsyncRequestStream(RequestStream):
    """Deliveries from the engine thread land in an asyncio.Queue on `loop`.

    Build through `factory(loop)`, which EngineThread.submit/adopt accept as `stream_cls`.
    """

    def __init__(self, owner, request_id: str, *, loop: asyncio.AbstractEventLoop):
        super().__init__(owner, request_id)
        self.loop = loop                # EngineThread hands a step's outputs to the loop at once
        self._aq: asyncio.Queue = asyncio.Queue()
        # Set by an Outputs sink's relay (output_sinks.py): takes an unfinished output on the loop as
        # the engine hands it over, instead of waking the stream's task; returns False to queue it.
        self.divert: Callable[[RequestOutput], bool] | None = None

    @classmethod
    def factory(cls, loop: asyncio.AbstractEventLoop):
        return lambda owner, request_id: cls(owner, request_id, loop=loop)

    def _put(self, item) -> None:           # engine thread (errors, aborts: one at a time)
        self.loop.call_soon_threadsafe(self._aq.put_nowait, item)

    def _put_now(self, item) -> None:       # on self.loop
        # Diverted only behind an empty queue, so outputs keep their order; errors and the finished
        # output always go to the task.
        if (self.divert is not None and self._aq.empty() and isinstance(item, RequestOutput) and not item.finished
                and self.divert(item)):
            return
        self._aq.put_nowait(item)

    async def next_batch(self) -> list[RequestOutput]:
        """Wait for at least one output, then take every output already queued (in order).

        Raises ValueError when the engine refused the request and EngineDeadError when the
        engine stopped. The last list ends with the finished output.
        """
        items = [await self._aq.get()]
        while not self._aq.empty() and not self._is_final(items[-1]):
            items.append(self._aq.get_nowait())
        outputs = []
        for item in items:
            if isinstance(item, ValueError):
                raise item
            if isinstance(item, BaseException):
                raise EngineDeadError(str(item)) from item
            outputs.append(item)
        if outputs[-1].finished:
            self.finished = True
        return outputs

    @staticmethod
    def _is_final(item) -> bool:
        return isinstance(item, BaseException) or item.finished

    def cancel(self) -> None:
        """Abort the request in the engine unless it already finished. Idempotent."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)
