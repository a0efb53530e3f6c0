"""The aiohttp application of the OpenAI-compatible API (routes in the package docstring, plus
/metrics and /v1/models/{id}).

A generation request: JSON → ParsedRequest (requests.py) → the shared build_request (the gRPC
path's validation) → router.live (so the gRPC Abort RPC reaches HTTP requests too) →
router.metrics.track(Dispatcher.generate(rr)) → OpenAI JSON (responses.py). Streaming waits
for the first message before sending headers, so errors that happen before any token (no
instance, cluster full) come back as an HTTP status with OpenAI's error JSON; later ones as an
`{"error": ...}` event followed by `[DONE]`. A client that disconnects cancels its handler (the
runner runs with handler_cancellation), which cancels the worker calls and releases everything
the request held, exactly as a cancelled gRPC stream does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse

from aiohttp import web

from router.request import choices
from router.request.dispatch import RouteError
from router.openai_api.chat_template import ChatTemplate
from router.openai_api.openapi import openapi_document
from router.openai_api.errors import ApiError, from_invalid_request, from_status, invalid
from router.openai_api.requests import ParsedRequest, parse_chat, parse_completion
from router.openai_api.responses import Answer, TokenTexts, combined_response, combined_usage
from router.request.validation import build_request_async
from services.engine.sampling_params import InvalidRequestError
from services.metrics_http import metrics_response

log = logging.getLogger("tandem.router.http")
API = "openai"
MAX_BODY_BYTES = 32 << 20           # long token-id prompts are large JSON


class OpenAIApi:
    """Handlers over one Router (model, tokenizer, dispatcher, live requests, metrics)."""

    def __init__(self, router, template: ChatTemplate):
        self.router, self.template = router, template
        self.token_texts = TokenTexts(router.tokenizer)
        self.started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id:.+}", self.model)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    # ---- plain routes -------------------------------------------------------------------------
    def _model_card(self) -> dict:
        m = self.router.model
        return {"id": m.model_id, "object": "model", "created": self.started, "owned_by": "tandem",
                "root": m.model_id, "max_model_len": m.max_position_embeddings, "vocab_size": m.vocab_size}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model_id"] != self.router.model.model_id:
            raise ApiError(404, f"model {request.match_info['model_id']!r} does not exist here; this server serves "
                                f"{self.router.model.model_id!r}", param="model", code="model_not_found")
        return web.json_response(self._model_card())

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI 3.0 document of this API (router/openai_api/openapi.py)."""
        m = self.router.model
        return web.json_response(openapi_document(m.model_id, m.max_position_embeddings))

    async def health(self, request: web.Request) -> web.Response:
        """200 when the router can place a request now; 503 saying what is missing otherwise."""
        prefill, decode, colocated = self.router.dispatcher.pools()
        counts = {"prefill": len(prefill), "decode": len(decode), "colocated": len(colocated)}
        if (prefill and decode) or colocated:
            return web.json_response({"status": "ok", "serving_instances": counts})
        reason = ("no decode instance is serving" if prefill else "no prefill instance is serving" if decode
                  else "no instance is serving")
        return web.json_response({"status": "unavailable", "reason": reason, "serving_instances": counts},
                                 status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.router.metrics.registry, request)

    # ---- generation ---------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        r = self.router
        try:
            body = await _json_body(request)
            if kind == "chat":      # renders and tokenizes: off the event loop
                parsed = await asyncio.to_thread(parse_chat, body, r.model, r.tokenizer, self.template)
            else:
                parsed = parse_completion(body, r.model, r.tokenizer)
            if not parsed.request.request_id:
                parsed.request.request_id = request.headers.get("X-Request-Id", "")[:256]
            try:
                rr = await build_request_async(parsed.request, r.model, r.tokenizer, None)
            except InvalidRequestError as e:
                raise from_invalid_request(e, parsed.rename or {}) from None
            if rr.request_id in r.live:
                raise ApiError(409, f"request_id: {rr.request_id!r} is already running; use a unique id",
                               param="request_id", outcome="already_exists")
        except ApiError as e:
            r.metrics.rejected(API, e.outcome)
            return e.response()
        r.live[rr.request_id] = rr
        try:
            n, best_of = choices.check_choices(parsed.request.params)
            answers = [Answer(parsed, rr.request_id, r.model.model_id, len(rr.prompt_token_ids), self.token_texts,
                              rr.prompt_token_ids, index=i, resumed_after=len(rr.resume_token_ids or ()))
                       for i in range(n)]
            stream = choices.stream(rr, lambda c: r.metrics.track(c, r.requests.generate(c), API),
                                    keep_logprobs=parsed.logprobs is not None)
            async with contextlib.aclosing(stream):
                if parsed.stream:
                    return await _stream(request, parsed, rr, stream, answers)
                return await _whole(parsed, rr, stream, answers)
        finally:
            if r.live.get(rr.request_id) is rr:
                del r.live[rr.request_id]

    # ---- errors -------------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """/v1 routes need an API key when the router has keys (router/client_auth.py): 401 otherwise."""
        refusal = self.router.client_auth.http_refusal(request.path, request.headers.get("Authorization"))
        if refusal is not None:
            self.router.metrics.rejected(API, "unauthenticated")
            raise ApiError(401, refusal, code="invalid_api_key", outcome="unauthenticated")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every error leaves as OpenAI's error JSON; unexpected ones are logged, never shown."""
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return ApiError(e.status, f"{request.method} {request.path}: {e.reason}", code=str(e.status)).response()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("internal error in %s %s", request.method, request.path)
            return ApiError(500, "internal error in the router; its log has the details").response()


def _sse(data) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


def _aborted(rr) -> bool:
    """The Abort RPC ended the request (not a cancellation of this handler: the client is still here)."""
    task = asyncio.current_task()
    return rr.aborted and not (task is not None and task.cancelling())


def _headers(parsed: ParsedRequest, rr) -> dict:
    """X-Request-Id, and X-Tandem-Ignored-Fields naming the unknown fields the request carried."""
    headers = {"X-Request-Id": header_value(rr.request_id)}
    if parsed.ignored:
        headers["X-Tandem-Ignored-Fields"] = ignored_fields_header(parsed.ignored)
    return headers


def header_value(text: str, limit: int = 1024) -> str:
    """`text` as a safe HTTP header value: printable ASCII kept, anything else (newlines, control
    characters, non-ASCII: a field name is any JSON string) percent-encoded, at most `limit`
    characters. A raw newline made aiohttp drop the connection without a response (make fuzz)."""
    return urllib.parse.quote(text, safe=" !\"#$%&'()*+,-./:;<=>?@[]^_`{|}~")[:limit]


def ignored_fields_header(names: list[str]) -> str:
    """The X-Tandem-Ignored-Fields value: the names, comma-separated (a comma in a name is %2C)."""
    return header_value(",".join(urllib.parse.quote(n, safe="") if "," in n else n for n in names))


async def _whole(parsed: ParsedRequest, rr, stream, answers: list[Answer]) -> web.Response:
    try:
        async for message in stream:
            answers[message.choice].add(message)
    except RouteError as e:
        return from_status(e.code, e.message, getattr(e, "retry_after_s", 0)).response()
    except asyncio.CancelledError:
        if not _aborted(rr):
            raise
        for answer in answers:
            answer.finish_reason = answer.finish_reason or "abort"
    return web.json_response(combined_response(answers), headers=_headers(parsed, rr))


async def _stream(request: web.Request, parsed: ParsedRequest, rr, stream,
                  answers: list[Answer]) -> web.StreamResponse:
    aborted = False
    unfinished = set(range(len(answers)))
    try:
        message = await anext(stream)
    except RouteError as e:
        return from_status(e.code, e.message, getattr(e, "retry_after_s", 0)).response()
    except asyncio.CancelledError:
        if not _aborted(rr):
            raise
        message, aborted = None, True
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       **_headers(parsed, rr)})
    await resp.prepare(request)
    try:
        try:
            while message is not None:
                answer = answers[message.choice]
                delta = answer.add(message)
                for chunk in answer.chunks(delta, message.finished):
                    await resp.write(_sse(chunk))
                if message.finished:
                    unfinished.discard(message.choice)
                    if not unfinished:
                        break
                message = await anext(stream, None)
        except RouteError as e:
            await resp.write(_sse(from_status(e.code, e.message).body()))
            await resp.write(_sse(b"[DONE]"))
            return resp
        except asyncio.CancelledError:
            if not _aborted(rr):
                raise
            aborted = True
        if aborted:                      # the Abort RPC: end the stream as OpenAI-style clients expect
            for i in sorted(unfinished):
                answers[i].finish_reason = "abort"
                for chunk in answers[i].chunks({"text": "", "token_ids": [], "logprobs": None}, True):
                    await resp.write(_sse(chunk))
        if parsed.include_usage:
            chunk = answers[0].usage_chunk()
            chunk["usage"] = combined_usage(answers)
            await resp.write(_sse(chunk))
        await resp.write(_sse(b"[DONE]"))
        await resp.write_eof()
    except ConnectionResetError:         # the client left mid-stream: closing the stream releases the request
        log.info("client disconnected from %s", rr.request_id)
    return resp


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid(None, "the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise invalid(None, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body

