"""The chart's values.yaml defaults are the components' own (services/engine/settings.py,
services/worker/settings.py, router/settings.py and the policy configs): one default per idea.
Where the chart differs on purpose, the difference is listed here with its reason."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.request.admission import DEFAULT_ADMISSION
from router.autoscale.config import AutoscalerConfig
from router.cluster.pools_args import DEFAULT_POOLS
from router.cluster.role_policy import RolePolicyConfig
from router.request.routing_args import DEFAULT_ROUTING
from router.settings import ROUTER_DEFAULTS
from services.engine.settings import ENGINE_DEFAULTS
from services.worker.settings import WORKER_DEFAULTS

VALUES = yaml.safe_load((Path(__file__).resolve().parents[2] / "k8s" / "tandem" / "values.yaml").read_text())

# (values path, the component default it must equal)
SAME = [
    ("model.dtype", ENGINE_DEFAULTS.dtype),
    ("engine.blockSize", ENGINE_DEFAULTS.block_size),
    ("engine.kvMemoryGib", ENGINE_DEFAULTS.kv_memory_gib),
    ("engine.maxNumBatchedTokens", ENGINE_DEFAULTS.max_num_batched_tokens),
    ("engine.maxNumSeqs", ENGINE_DEFAULTS.max_num_seqs),
    ("engine.preemptionMode", ENGINE_DEFAULTS.preemption_mode),
    ("engine.kvCompressFraction", ENGINE_DEFAULTS.kv_compress_fraction),
    ("engine.maxModelLen", ENGINE_DEFAULTS.max_model_len),
    ("engine.leaseMs", WORKER_DEFAULTS.lease_ms),
    ("engine.leaseMs", ROUTER_DEFAULTS.lease_ms),
    ("engine.layerGroup", WORKER_DEFAULTS.layer_group),
    ("engine.transferTimeoutSeconds", WORKER_DEFAULTS.transfer_timeout_s),
    ("engine.heartbeatTtlSeconds", WORKER_DEFAULTS.heartbeat_ttl_s),
    ("kvTransport", WORKER_DEFAULTS.kv_transport),
    ("workers.graceSeconds", WORKER_DEFAULTS.grace_s),
    ("workers.orphanGraceSeconds", WORKER_DEFAULTS.orphan_grace_s),
    ("router.port", ROUTER_DEFAULTS.port),
    ("router.pools", DEFAULT_POOLS),
    ("router.routing", DEFAULT_ROUTING),
    ("router.queuePolicy", ENGINE_DEFAULTS.queue_policy),
    ("router.queueAgingSeconds", ENGINE_DEFAULTS.queue_aging_s),
    ("router.admission", DEFAULT_ADMISSION),
    ("router.slo.ttftSeconds", RolePolicyConfig.ttft_slo_s),
    ("router.slo.tpotSeconds", RolePolicyConfig.tpot_slo_s),
    ("autoscaler.ttftSloSeconds", AutoscalerConfig.ttft_slo_s),
    ("autoscaler.tpotSloSeconds", AutoscalerConfig.tpot_slo_s),
    ("autoscaler.scaleUpCooldownSeconds", AutoscalerConfig.scale_up_cooldown_s),
    ("autoscaler.scaleDownCooldownSeconds", AutoscalerConfig.scale_down_cooldown_s),
    ("autoscaler.scaleDownStabilizationSeconds", AutoscalerConfig.scale_down_stabilization_s),
]

# Deliberate differences (the chart always renders these flags, so the CLI default never applies there):
DIFFERENT = [
    ("model.name", "small", ENGINE_DEFAULTS.model),   # a deployment serves a model of some size; the CLI's is for tests
]


def _get(path: str):
    node = VALUES
    for key in path.split("."):
        node = node[key]
    return node


@pytest.mark.parametrize("path,default", SAME, ids=[p for p, _ in SAME])
def test_chart_default_is_the_components(path, default):
    value = _get(path)
    assert value == default and (value is None) == (default is None), f"values.yaml {path}: {value!r} != {default!r}"


@pytest.mark.parametrize("path,chart,cli", DIFFERENT, ids=[p for p, *_ in DIFFERENT])
def test_deliberate_differences_are_still_the_listed_ones(path, chart, cli):
    assert _get(path) == chart and chart != cli
