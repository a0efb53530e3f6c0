"""Who may call Tandem: client API keys at the router, a shared cluster token between members.

Settings (read in services/env.py; flags win over the environment; both may be given for API keys):

    TANDEM_API_KEYS          comma-separated client API keys (router; `--api-key KEY`, repeatable)
    TANDEM_CLUSTER_TOKEN     the secret every router and worker of a cluster shares
    TANDEM_API_KEY           the key the `tandem` command line sends (else it sends the cluster token)

No keys: the client APIs are open (as before). No cluster token: worker RPCs and the KV data plane
are open (a NetworkPolicy is then the only fence). Health and metrics stay open either way.

Clients send `authorization: Bearer <key>` (gRPC metadata; the HTTP header for the OpenAI API).
Cluster members send `tandem-cluster-token: <token>` on every tandem.v1.Worker call; the KV data
plane proves the token by challenge-response in its handshake (services/transport/
control_connection.py and control_receiver.py: the receiver sends a fresh nonce, the sender answers
HMAC-SHA256(token, nonce), the receiver proves it too), so the token never crosses the wire and a replayed handshake fails. Every comparison is
constant-time (hmac.compare_digest).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Mapping

import grpc

from services import env

API_KEYS_ENV = env.API_KEYS
API_KEY_ENV = env.API_KEY            # the key the `tandem` command line sends (generate, admin)
CLUSTER_TOKEN_ENV = env.CLUSTER_TOKEN
CLUSTER_TOKEN_METADATA = "tandem-cluster-token"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")      # never need a key or token

API_KEY_FIX = (f"send your API key as `authorization: Bearer <key>` (Client(..., api_key=KEY); "
               f"OpenAI clients: api_key=KEY); ask the cluster's operator for one")
CLUSTER_TOKEN_FIX = (f"give every router and worker of the cluster the same cluster token "
                     f"({CLUSTER_TOKEN_ENV}; the chart's Secret)")


def api_keys(flags: Iterable[str] = (), environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The client API keys: --api-key flags plus TANDEM_API_KEYS, blanks dropped, order kept."""
    keys = [k.strip() for k in flags] + list(env.api_keys(environ))
    return tuple(dict.fromkeys(k for k in keys if k))


def cluster_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """TANDEM_CLUSTER_TOKEN, or None when unset or blank."""
    return env.cluster_token(environ)


def client_credential(environ: Mapping[str, str] = os.environ) -> str | None:
    """What the `tandem` command line sends as its bearer credential: TANDEM_API_KEY, else the
    cluster token (which the router's Admin API accepts: a pod's drain hook has it)."""
    return env.api_key(environ) or cluster_token(environ)


def key_label(key: str) -> str:
    """What metrics and logs name a key by: a short hash, never the key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRing:
    """A set of accepted secrets. `match(presented)` is the label of the key presented, or None;
    every key is compared (constant-time each), so the time does not tell which one nearly matched."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [(k.encode(), key_label(k)) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def labels(self) -> list[str]:
        return [label for _, label in self._keys]

    def match(self, presented: str | None) -> str | None:
        given = (presented or "").encode()
        found = None
        for key, label in self._keys:
            if hmac.compare_digest(key, given) and found is None:
                found = label
        return found


def bearer(value: str | None) -> str | None:
    """The credential of an `authorization: Bearer <x>` value; None when absent or another scheme."""
    scheme, _, credential = (value or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None


def kv_proof(token: str, nonce: str, side: str) -> str:
    """The KV handshake's answer to `nonce` by `side` ("sender" or "receiver")."""
    return hmac.new(token.encode(), f"tandem-kv/{side}/{nonce}".encode(), hashlib.sha256).hexdigest()


def kv_proof_ok(token: str, nonce: str, side: str, presented: str | None) -> bool:
    return hmac.compare_digest(kv_proof(token, nonce, side).encode(), (presented or "").encode())


class MetadataAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the services under `prefixes` with UNAUTHENTICATED unless check(metadata)
    returns None (it returns the refusal's message otherwise); other services, and health, pass
    untouched."""

    def __init__(self, prefixes: tuple[str, ...], check: Callable[[dict], str | None]):
        self.prefixes, self.check = prefixes, check

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(self.prefixes) or method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ())}
        refusal = self.check(metadata)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, refusal)


def _refusing(handler, message: str):
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED with `message`."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


def api_key_check(keys: KeyRing, on_allowed: Callable[[str], None] = lambda label: None):
    """check() for MetadataAuthInterceptor: a Bearer key among `keys`."""
    def check(metadata: dict) -> str | None:
        presented = bearer(metadata.get("authorization"))
        if presented is None:
            return f"missing API key: {API_KEY_FIX}"
        label = keys.match(presented)
        if label is None:
            return f"invalid API key (unknown or revoked): {API_KEY_FIX}"
        on_allowed(label)
        return None
    return check


def cluster_token_check(token: str):
    """check() for MetadataAuthInterceptor: the cluster token in `tandem-cluster-token`."""
    ring = KeyRing([token])

    def check(metadata: dict) -> str | None:
        presented = metadata.get(CLUSTER_TOKEN_METADATA)
        if presented is None:
            return f"this worker accepts calls from cluster members only (no cluster token sent): {CLUSTER_TOKEN_FIX}"
        if ring.match(presented) is None:
            return f"wrong cluster token: {CLUSTER_TOKEN_FIX}"
        return None
    return check


class _AddMetadata:
    """Adds fixed metadata to every call of a channel (grpc.aio files an interceptor under one
    call kind only, so the channel gets one subclass per kind)."""

    def __init__(self, pairs: tuple[tuple[str, str], ...]):
        self.pairs = pairs

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self.pairs
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else \
            grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                       details.wait_for_ready)


class _AddMetadataUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AddMetadataStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def cluster_interceptors(token: str | None) -> list:
    """Client interceptors for channels to workers: the cluster token on every call (none without one)."""
    pairs = ((CLUSTER_TOKEN_METADATA, token),)
    return [_AddMetadataUnary(pairs), _AddMetadataStream(pairs)] if token else []

