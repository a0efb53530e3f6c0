"""The router's own settings: one default and one help text each, read by `python -m router`,
Router(...), `tandem up` and checked against the Helm chart's values
(tests/k8s/test_chart_defaults.py). The policy groups keep theirs in their frozen configs
(router/migration_policy.PolicyConfig, router/role_policy.RolePolicyConfig, the autoscaler's)."""
from __future__ import annotations

from dataclasses import dataclass

from services.settings import setting
from services.worker.settings import LEASE_MS


@dataclass(frozen=True)
class RouterSettings:
    model: str = setting("tiny", "the model the workers serve (HF directory or named model)")
    cluster: str = setting("default", "cluster name (Redis key prefix)")
    host: str = setting("127.0.0.1", "address to serve gRPC on")
    port: int = setting(50051, "gRPC port (0: a free one)")
    lease_ms: int = setting(LEASE_MS, "decode reservation lease")
    poll_interval_s: float = setting(0.5, "how often the registry is read")
    queue_timeout_s: float = setting(
        10.0, "how long a request waits for KV room when every instance is full (0: refuse at once)")
    reschedule_interval_ms: float = setting(75.0, "how often loads are read (50-100 ms)")

    @property
    def reschedule_interval_s(self) -> float:
        return self.reschedule_interval_ms / 1e3


ROUTER_DEFAULTS = RouterSettings()
RESCHEDULE_INTERVAL_S = ROUTER_DEFAULTS.reschedule_interval_s      # 0.075
