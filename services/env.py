"""Every environment variable Tandem reads, typed, read here and nowhere else.

    TANDEM_API_KEYS          comma-separated client API keys the router requires (services/auth.py)
    TANDEM_API_KEY           the key the `tandem` command line sends (else the cluster token)
    TANDEM_CLUSTER_TOKEN     the secret every router and worker of a cluster shares
    TANDEM_TLS_CERT          PEM certificate a member presents (services/member_tls.py), with
    TANDEM_TLS_KEY           its PEM private key and
    TANDEM_TLS_CA            the PEM CA that signed every member's certificate: mutual TLS on worker gRPC
    TANDEM_TLS_SERVER_NAME   the name worker certificates carry (default tandem-worker)
    TANDEM_MODEL_CACHE       where named real models are kept (default ~/.cache/tandem/models)
    TANDEM_KERNEL_CACHE      where the fused CPU attention kernels are built (default under ~/.cache/tandem)
    TANDEM_DISABLE_KERNELS   1/true/yes/on: never build them, use the pure-torch path
    KUBERNETES_SERVICE_HOST  set inside a pod: the autoscaler uses the pod's ServiceAccount
    PEER_VENV                the vLLM CPU venv the comparison benchmarks run (loadgen, benchmarks/)
    TANDEM_ALLOCATOR         auto | tcmalloc | system: an engine process's malloc (services/allocator.py)
    TANDEM_ALLOCATOR_REEXEC  set by services/allocator.py on the process it re-executed (never loop)
    LD_PRELOAD               kept, with tcmalloc put in front, when re-executing under it

Each reader takes `environ` (default: this process's) so tests pass a dict. Blank counts as unset.
Writers (tandem/__init__.py's GRPC_ENABLE_FORK_SUPPORT default, the environment LocalCluster gives
its children) use the names below.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

API_KEYS = "TANDEM_API_KEYS"
API_KEY = "TANDEM_API_KEY"
CLUSTER_TOKEN = "TANDEM_CLUSTER_TOKEN"
TLS_CERT = "TANDEM_TLS_CERT"
TLS_KEY = "TANDEM_TLS_KEY"
TLS_CA = "TANDEM_TLS_CA"
TLS_SERVER_NAME = "TANDEM_TLS_SERVER_NAME"
MODEL_CACHE = "TANDEM_MODEL_CACHE"
KERNEL_CACHE = "TANDEM_KERNEL_CACHE"
DISABLE_KERNELS = "TANDEM_DISABLE_KERNELS"
KUBERNETES_SERVICE_HOST = "KUBERNETES_SERVICE_HOST"
PEER_VENV = "PEER_VENV"
ALLOCATOR = "TANDEM_ALLOCATOR"
ALLOCATOR_REEXEC = "TANDEM_ALLOCATOR_REEXEC"
LD_PRELOAD = "LD_PRELOAD"

_TRUE = ("1", "true", "yes", "on")


def _text(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def api_keys(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """TANDEM_API_KEYS split on commas, blanks dropped, order kept."""
    return tuple(k.strip() for k in _text(API_KEYS, environ).split(",") if k.strip())


def api_key(environ: Mapping[str, str] | None = None) -> str | None:
    return _text(API_KEY, environ) or None


def cluster_token(environ: Mapping[str, str] | None = None) -> str | None:
    return _text(CLUSTER_TOKEN, environ) or None


def tls_files(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The TLS variables that are set: {TANDEM_TLS_CERT: path, ...} (cert, key, CA)."""
    return {name: _text(name, environ) for name in (TLS_CERT, TLS_KEY, TLS_CA) if _text(name, environ)}


def tls_server_name(environ: Mapping[str, str] | None = None) -> str | None:
    return _text(TLS_SERVER_NAME, environ) or None


def model_cache(environ: Mapping[str, str] | None = None) -> Path | None:
    value = _text(MODEL_CACHE, environ)
    return Path(value).expanduser() if value else None


def kernel_cache(environ: Mapping[str, str] | None = None) -> Path | None:
    value = (os.environ if environ is None else environ).get(KERNEL_CACHE)     # as before: not stripped
    return Path(value).expanduser() if value else None


def kernels_disabled(environ: Mapping[str, str] | None = None) -> bool:
    return _text(DISABLE_KERNELS, environ).lower() in _TRUE


def in_kubernetes(environ: Mapping[str, str] | None = None) -> bool:
    return bool((os.environ if environ is None else environ).get(KUBERNETES_SERVICE_HOST))


def peer_venv(environ: Mapping[str, str] | None = None) -> str:
    return (os.environ if environ is None else environ).get(
        PEER_VENV, os.path.expanduser("~/.cache/tandem-peers/vllm-cpu"))


def allocator(environ: Mapping[str, str] | None = None) -> str:
    """TANDEM_ALLOCATOR lower-cased, `auto` when unset (services/allocator.py validates it)."""
    return _text(ALLOCATOR, environ).lower() or "auto"


def allocator_reexecuted(environ: Mapping[str, str] | None = None) -> bool:
    return bool(_text(ALLOCATOR_REEXEC, environ))


def ld_preload(environ: Mapping[str, str] | None = None) -> str:
    return _text(LD_PRELOAD, environ)
