"""Process logging for the router and workers: text or one JSON object per line, with the
request id of whatever the current task is doing.

    configure("worker", fmt="json", level="info", instance="decode-0")
    with request_context("req-1234"):
        log.info("released lease")   # {"ts": ..., "level": "INFO", "request_id": "req-1234", ...}

The request id lives in a ContextVar: each asyncio task (one per RPC or HTTP request) sees its
own. The router binds it when a request starts; workers bind it from the request message of
every RPC (services/worker/request_context.py), so one id ties a request's lines together across
processes. A JSON line holds `ts` (UTC, ISO 8601), `level`, `logger`, `component`, `instance`
(when set), `request_id` (when bound), `message`, any `extra={...}` fields of the call, and
`exception` (the formatted traceback) when one was logged.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tandem_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "request_id", "component", "instance", "taskName"}


def bind_request_id(request_id: str | None) -> contextvars.Token:
    """Tag this task's later log lines with `request_id`; undo with REQUEST_ID.reset(token)."""
    return REQUEST_ID.set(request_id or None)


@contextlib.contextmanager
def request_context(request_id: str | None):
    """`with request_context(rid):` tags the lines logged inside the block."""
    token = bind_request_id(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class _ContextFilter(logging.Filter):
    """Adds component, instance and the bound request id to every record (never drops one)."""

    def __init__(self, component: str, instance: str | None):
        super().__init__()
        self.component, self.instance = component, instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        record.instance = self.instance
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, keys as in the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "component": getattr(record, "component", None),
            "message": record.getMessage(),
        }
        for key in ("instance", "request_id"):
            value = getattr(record, key, None)
            if value:
                out[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message`; the bracket is left out outside a request."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (it may be replaced after configure)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(component: str, fmt: str = "text", level: str = "info", instance: str | None = None,
              stream=None) -> None:
    """Route the root logger to `stream` (default: sys.stderr) in `fmt`. Calling it again replaces
    the handler an earlier call installed; handlers installed by others stay.

    Raises ValueError naming the flag for an unknown format or level.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--log-format {fmt!r}: use one of {', '.join(FORMATS)}")
    if level.lower() not in LEVELS:
        raise ValueError(f"--log-level {level!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter(component, instance))
    handler._tandem = True
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_tandem", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "asyncio", "grpc._cython.cygrpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def add_arguments(parser) -> None:
    """--log-format and --log-level, shared by `python -m router` and `python -m services.worker`."""
    parser.add_argument("--log-format", default="text", choices=FORMATS,
                        help="text lines, or one JSON object per line (request_id included)")
    parser.add_argument("--log-level", default="info", choices=LEVELS)
