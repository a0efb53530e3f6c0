"""The router's front door checks (services/auth.py has the settings and the mechanics).

With API keys configured (`--api-key`, TANDEM_API_KEYS): tandem.v1.Serving calls and the OpenAI
API's /v1 routes need `authorization: Bearer <key>` (UNAUTHENTICATED / HTTP 401 naming the fix
otherwise); tandem.v1.Admin takes a key or the cluster token (the autoscaler's drain calls carry
the token, as metadata or as the bearer credential). Health, /health and /metrics stay open. Without keys everything is open, as before.
Each accepted call counts under its key's label (a hash, never the key) in
tandem_api_key_requests_total{key}.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from services.auth import (API_KEY_FIX, CLUSTER_TOKEN_METADATA, KeyRing, MetadataAuthInterceptor, api_key_check,
                           bearer)

SERVING = "/tandem.v1.Serving/"
ADMIN = "/tandem.v1.Admin/"
HTTP_PROTECTED = "/v1/"


class ClientAuth:
    def __init__(self, keys: Iterable[str], cluster_token: str | None = None,
                 on_allowed: Callable[[str], None] = lambda label: None):
        self.keys, self.on_allowed = KeyRing(keys), on_allowed
        self._token = KeyRing([cluster_token] if cluster_token else [])

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def grpc_interceptors(self) -> list:
        """Server interceptors for the router's gRPC server (none without keys)."""
        if not self.keys:
            return []
        serving = api_key_check(self.keys, self.on_allowed)

        def admin(metadata: dict) -> str | None:
            if self._token and (self._token.match(metadata.get(CLUSTER_TOKEN_METADATA)) is not None
                                or self._token.match(bearer(metadata.get("authorization"))) is not None):
                return None
            return serving(metadata)
        return [MetadataAuthInterceptor((SERVING,), serving), MetadataAuthInterceptor((ADMIN,), admin)]

    def http_refusal(self, path: str, authorization: str | None) -> str | None:
        """Why an HTTP request to `path` is refused (401), or None to serve it."""
        if not self.keys or not path.startswith(HTTP_PROTECTED):
            return None
        presented = bearer(authorization)
        if presented is None:
            return f"missing API key: {API_KEY_FIX}"
        label = self.keys.match(presented)
        if label is None:
            return f"invalid API key (unknown or revoked): {API_KEY_FIX}"
        self.on_allowed(label)
        return None
