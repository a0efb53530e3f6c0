"""OpenAI's error shape and the mapping from Tandem's errors to HTTP statuses.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with a status that
says who must act: 400 for a request to fix (param names the field), 404 for an unknown model or
route, 409 for a request id already running, 429 when the cluster is full (retry), 503 when no
instance can serve (retry), 504 when a deadline passed, 500 for a bug. Never a traceback.
"""
from __future__ import annotations

import grpc
from aiohttp import web

from services.engine.sampling_params import InvalidRequestError

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.ABORTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error", 499: "cancelled",
         503: "service_unavailable_error", 504: "timeout_error"}


class ApiError(Exception):
    """An error to send as OpenAI's error JSON. `outcome` is the metrics label for it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 outcome: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.outcome = outcome or ("invalid_argument" if status == 400 else _outcome_of(status))
        self.retry_after_s = 0          # seconds for a Retry-After header (429 from SLO admission); 0: none

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def invalid(param: str | None, message: str) -> ApiError:
    """A 400 naming `param`; the message starts with the parameter so it reads on its own."""
    return ApiError(400, f"{param}: {message}" if param else message, param)


def from_invalid_request(e: InvalidRequestError, rename: dict[str, str]) -> ApiError:
    """A 400 for a validation error of the shared gRPC path, its field renamed to the JSON name."""
    field = e.field.removeprefix("params.")
    param = rename.get(field, field)
    message = str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
    return invalid(param, message)


def from_status(code: grpc.StatusCode, message: str, retry_after_s: int = 0) -> ApiError:
    status = _STATUS.get(code, 500)
    error = ApiError(status, message, code=code.name.lower(), outcome=code.name.lower())
    error.retry_after_s = retry_after_s
    return error


def _outcome_of(status: int) -> str:
    for code, s in _STATUS.items():
        if s == status:
            return code.name.lower()
    return "internal"
