"""The gRPC status of a request the engine thread would not take (EngineThread.submit or adopt)."""
from __future__ import annotations

import grpc

from services.engine.engine_thread import EngineDeadError
from services.engine.sampling_params import InvalidRequestError

REFUSALS = (ValueError, EngineDeadError)     # InvalidRequestError is a ValueError


async def abort_refused(context, error: BaseException) -> None:
    """Abort the RPC for `error` (one of REFUSALS): INVALID_ARGUMENT for a request its sender can fix,
    UNAVAILABLE for a stopped engine, ALREADY_EXISTS for an id in use here."""
    if isinstance(error, InvalidRequestError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, EngineDeadError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
    await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(error))
