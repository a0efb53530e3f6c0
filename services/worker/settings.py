"""A worker's own settings (beyond the engine's, services/engine/settings.py): one default and one
help text each, read by `python -m services.worker`, WorkerOptions, the router (the lease it grants
with) and checked against the Helm chart's values (tests/k8s/test_chart_defaults.py)."""
from __future__ import annotations

from dataclasses import dataclass

from services.settings import setting

# services/transport/selection.py SETTINGS, written here too so that `tandem up` (no torch) can offer
# them; tests/unit/test_settings.py keeps the two equal.
KV_TRANSPORTS = ("auto", "tcp", "nccl", "cuda_ipc")
# A decode reservation waits this long for its KV; the router grants with the same (router/settings.py).
LEASE_MS = 30_000


@dataclass(frozen=True)
class WorkerSettings:
    kv_transport: str = setting(
        "auto", "KV data plane: auto (cuda_ipc on one GPU, nccl between GPUs, tcp otherwise) or one of them; "
        "both ends of a transfer must agree", choices=KV_TRANSPORTS)
    lease_ms: int = setting(LEASE_MS, "how long a decode reservation waits for its KV")
    layer_group: int = setting(2, "layers per KV push during prefill")
    transfer_timeout_s: float = setting(30.0, "a KV transfer that makes no progress this long fails")
    heartbeat_ttl_s: float = setting(3.0, "the registry record expires this long after the last heartbeat")
    heartbeat_interval_s: float = setting(
        1.0, "how often the load report is published (also at once on a state change, and when a reservation "
        "was refused for room); below --heartbeat-ttl-s")
    grace_s: float = setting(10.0, "on SIGTERM, running requests get this long to finish")
    orphan_grace_s: float = setting(
        30.0, "a request whose router died (its stream lost) keeps decoding this long for a router to take it "
        "back by id, then is aborted; 0: abort it at once")
    migration_stop_copy_blocks: int = setting(
        2, "live migration pauses the request once at most this many KV blocks remain to copy")
    migration_max_stages: int = setting(8, "pre-copy stages before a migration gives up")
    max_migrations: int = setting(1, "concurrent migrations out of (and into) this instance")
    migration_watermark: float = setting(0.05, "fraction of KV blocks a migration destination keeps free")
    migration_lease_ms: int = setting(
        10_000, "a destination frees a migration reservation the source stops driving after this")


WORKER_DEFAULTS = WorkerSettings()
