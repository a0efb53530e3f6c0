"""Optional mutual TLS between cluster members: every tandem.v1.Worker call (router → worker,
worker → worker for migration) over TLS, each side proving itself with a certificate of the
cluster's CA.

Settings (services/env.py), PEM files, e.g. a Kubernetes TLS Secret mounted in every pod:

    TANDEM_TLS_CERT          this member's certificate (the same one may serve every member)
    TANDEM_TLS_KEY           its private key
    TANDEM_TLS_CA            the CA certificate that signed every member's certificate
    TANDEM_TLS_SERVER_NAME   the name a worker's certificate carries (DNS SAN), default tandem-worker:
                             pods' addresses change, so callers check this name, not the address

All three files set: a worker serves tandem.v1.Worker (and gRPC health on that port) only over TLS
and refuses a caller without a certificate of the CA in the handshake, before any RPC runs; routers
and workers present theirs when calling a worker. None set: plaintext, as before (the cluster token
of services/auth.py still applies either way; TLS adds encryption and a second, certificate-based
fence). Some but not all, or an unreadable file: MemberTLSError naming what to fix. The KV data
plane keeps its token handshake (challenge-response); it is not encrypted.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from services import env

DEFAULT_SERVER_NAME = "tandem-worker"
_NAMES = (env.TLS_CERT, env.TLS_KEY, env.TLS_CA)


class MemberTLSError(ValueError):
    """The TLS settings are incomplete or a file cannot be read; the message names the fix."""


@dataclass(frozen=True)
class MemberTLS:
    cert: bytes          # PEM certificate chain this member presents
    key: bytes           # PEM private key
    ca: bytes            # PEM CA certificate(s) a peer's certificate must chain to
    server_name: str = DEFAULT_SERVER_NAME

    def server_credentials(self) -> grpc.ServerCredentials:
        """A worker's port: its certificate, and a client certificate of the CA required."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A call to a worker: the worker's certificate checked against the CA, ours presented."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        """The name the worker's certificate is checked for, whatever address it is reached at."""
        return [("grpc.ssl_target_name_override", self.server_name)]


def member_tls(environ: Mapping[str, str] = os.environ) -> MemberTLS | None:
    """The TLS settings of this process; None when none is set. Raises MemberTLSError when only some
    are set or a file cannot be read."""
    given = env.tls_files(environ)
    if not given:
        return None
    missing = [name for name in _NAMES if name not in given]
    if missing:
        raise MemberTLSError(f"mutual TLS needs {', '.join(_NAMES)} together; {', '.join(missing)} not set "
                             f"(set every one, or none for plaintext)")
    pem = {}
    for name, path in given.items():
        try:
            with open(path, "rb") as f:
                pem[name] = f.read()
        except OSError as e:
            raise MemberTLSError(f"{name}={path}: cannot read it ({e.strerror}); mount the TLS Secret there "
                                 f"or fix the path") from None
        if b"-----BEGIN" not in pem[name]:
            raise MemberTLSError(f"{name}={path}: not a PEM file (no -----BEGIN line)")
    return MemberTLS(pem[env.TLS_CERT], pem[env.TLS_KEY], pem[env.TLS_CA],
                     env.tls_server_name(environ) or DEFAULT_SERVER_NAME)
