"""Typed errors of the client SDK: one class per gRPC status a caller is expected to handle.

Every error the SDK raises for a failed RPC is a `TandemError` carrying the status `code`, the
server's `details` and the `request_id` it concerned (None when unknown or not per request).
Callers catch the subclass they can act on (`UnavailableError`: try later; `InvalidArgumentError`:
fix the request) and let the rest propagate.
"""
from __future__ import annotations

import grpc


class TandemError(Exception):
    """A failed RPC. `code` is the gRPC status, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(f"{(code or self.code).name}: {details}")
        if code is not None:
            self.code = code
        self.details = details
        self.request_id = request_id


class InvalidArgumentError(TandemError):
    """The request was rejected as malformed; `details` names the field."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class UnavailableError(TandemError):
    """No instance could serve the request (or the server is unreachable); safe to retry later."""
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhaustedError(TandemError):
    """The cluster is full, or cannot meet the request's TTFT SLO now (SLO admission); then
    `retry_after_s` is the server's advice (its `retry-after` trailer), else None."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s: float | None = None


class DeadlineExceededError(TandemError):
    """The call's deadline passed before it completed."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(TandemError):
    """The call was cancelled (by the server, or by this process from another thread)."""
    code = grpc.StatusCode.CANCELLED


class NotFoundError(TandemError):
    """The named request, model or instance does not exist."""
    code = grpc.StatusCode.NOT_FOUND


class UnauthenticatedError(TandemError):
    """The router requires an API key and got none, or one it does not accept (unknown or revoked):
    pass `api_key=` to the client."""
    code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(TandemError):
    """The server failed, or its replies broke the protocol (raised by the SDK itself then)."""
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[TandemError]] = {
    cls.code: cls for cls in (InvalidArgumentError, UnavailableError, ResourceExhaustedError,
                              DeadlineExceededError, CancelledError, NotFoundError, UnauthenticatedError,
                              InternalError)}


def from_rpc_error(e: grpc.RpcError, request_id: str | None = None) -> TandemError:
    """The typed error for a failed call (sync or `grpc.aio`); codes without a class → TandemError."""
    code = (e.code() if callable(getattr(e, "code", None)) else None) or grpc.StatusCode.UNKNOWN
    details = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
    cls = _BY_CODE.get(code)
    if cls is None:
        return TandemError(details, code=code, request_id=request_id)
    error = cls(details, request_id=request_id)
    if isinstance(error, ResourceExhaustedError):
        error.retry_after_s = _retry_after(e)
    return error


def _retry_after(e: grpc.RpcError) -> float | None:
    """The `retry-after` trailer of a failed call (seconds), or None."""
    trailing = getattr(e, "trailing_metadata", None)
    try:
        for key, value in (trailing() if callable(trailing) else None) or ():
            if key == "retry-after":
                return float(value)
    except (TypeError, ValueError):
        return None
    return None
