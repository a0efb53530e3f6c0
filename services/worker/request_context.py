"""Carries the router's request id into a worker's logs: a gRPC server interceptor that binds the
id found in each tandem.v1.Worker request message (services/log_setup.REQUEST_ID) for the whole
RPC, and logs every RPC's end: DEBUG when it succeeded, INFO otherwise (with the status).

The id is the one the router assigned (or the client chose): WorkerRequest.request_id, or the
`request_id` of Decode/Release, so a request's lines carry the same id in the router's log and in
every worker it touched. Other services (health) pass through untouched.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc

from services.log_setup import bind_request_id

log = logging.getLogger("tandem.worker.rpc")
SERVICE_PREFIX = "/tandem.v1.Worker/"


def request_id_of(message) -> str | None:
    """The request id a Worker RPC message carries: `request_id`, or `request.request_id`."""
    rid = getattr(message, "request_id", None)
    if not rid and hasattr(message, "request"):
        rid = getattr(message.request, "request_id", None)
    return rid or None


def _outcome(context, error: BaseException | None) -> tuple[int, str]:
    """(log level, outcome word) of a finished RPC."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):    # the caller went away
        return logging.INFO, "cancelled"
    code = context.code() if hasattr(context, "code") else None
    if error is None and code in (None, grpc.StatusCode.OK):
        return logging.DEBUG, "ok"
    if code not in (None, grpc.StatusCode.OK):
        return logging.INFO, code.name
    return logging.INFO, f"error {type(error).__name__}"


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        name = method.removeprefix(SERVICE_PREFIX)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, name), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream, name), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


def _log_end(name: str, context, started: float, error: BaseException | None) -> None:
    level, outcome = _outcome(context, error)
    log.log(level, "%s %s in %.4fs", name, outcome, time.perf_counter() - started,
            extra={"rpc": name, "outcome": outcome, "duration_s": round(time.perf_counter() - started, 6)})


def _unary(behavior, name: str):
    async def wrapped(request, context):
        bind_request_id(request_id_of(request))       # this RPC's own task: no reset needed
        started, error = time.perf_counter(), None
        try:
            return await behavior(request, context)
        except BaseException as e:
            error = e
            raise
        finally:
            _log_end(name, context, started, error)
    return wrapped


def _stream(behavior, name: str):
    async def wrapped(request, context):
        bind_request_id(request_id_of(request))
        started, error = time.perf_counter(), None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as e:
            error = e
            raise
        finally:
            _log_end(name, context, started, error)
    return wrapped
