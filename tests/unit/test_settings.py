"""Settings carry their defaults and help once; every command line reads them (issue 21)."""
from __future__ import annotations

import argparse

from router.settings import RESCHEDULE_INTERVAL_S, ROUTER_DEFAULTS
from services.engine.settings import ENGINE_DEFAULTS, RUN_KV_MEMORY_GIB, EngineSettings
from services.settings import add_flags
from services.worker.settings import KV_TRANSPORTS, LEASE_MS, WORKER_DEFAULTS


def test_add_flags_takes_default_type_and_help():
    p = argparse.ArgumentParser()
    add_flags(p, EngineSettings, "block_size", "num_blocks", "dtype", defaults={"block_size": 32})
    a = p.parse_args([])
    assert (a.block_size, a.num_blocks, a.dtype) == (32, None, ENGINE_DEFAULTS.dtype)
    assert p.parse_args(["--num-blocks", "7"]).num_blocks == 7


def test_worker_cli_defaults_are_the_settings():
    from services.worker.__main__ import parse_args
    from services.worker.server import WorkerOptions
    opts = parse_args(["--role", "decode"])
    assert opts == WorkerOptions(role="decode")
    for name in ("block_size", "kv_memory_gib", "max_num_batched_tokens", "max_num_seqs", "queue_policy",
                 "queue_aging_s", "device", "dtype", "model"):
        assert getattr(opts, name) == getattr(ENGINE_DEFAULTS, name), name
    for name in ("lease_ms", "layer_group", "transfer_timeout_s", "heartbeat_ttl_s", "heartbeat_interval_s", "grace_s",
                 "migration_stop_copy_blocks", "migration_max_stages", "max_migrations", "migration_watermark",
                 "migration_lease_ms", "kv_transport"):
        assert getattr(opts, name) == getattr(WORKER_DEFAULTS, name), name


def test_tandem_run_and_up_read_the_engine_settings():
    from tandem.cli import build_parser
    run = build_parser().parse_args(["run", "--input", "-"])
    assert run.kv_memory_gib == RUN_KV_MEMORY_GIB == 2.0            # tandem run's own, on purpose
    assert (run.block_size, run.max_num_seqs, run.model) == (16, 256, "tiny")
    up = build_parser().parse_args(["up"])
    assert (up.port, up.model, up.cluster, up.block_size, up.lease_ms) == (ROUTER_DEFAULTS.port, "tiny", "default",
                                                                           None, None)   # None: the worker's own


def test_router_cli_defaults_are_the_settings(monkeypatch):
    import router.__main__ as router_main
    seen = {}

    class FakeRouter:
        def __init__(self, model, redis_url, **kw):
            seen.update(kw, model=model)

    monkeypatch.setattr(router_main, "Router", FakeRouter)
    monkeypatch.setattr(router_main.asyncio, "run", lambda coro: coro.close())
    assert router_main.main(["--redis", "redis://127.0.0.1:1/0"]) == 0
    assert seen["lease_ms"] == LEASE_MS == ROUTER_DEFAULTS.lease_ms == 30_000
    assert seen["reschedule_interval_s"] == RESCHEDULE_INTERVAL_S == 0.075
    assert (seen["port"], seen["poll_interval_s"], seen["queue_timeout_s"]) == (50051, 0.5, 10.0)


def test_kv_transport_choices_match_the_transport():
    from services.transport.selection import SETTINGS as TRANSPORT_SETTINGS
    assert KV_TRANSPORTS == TRANSPORT_SETTINGS


def test_environment_is_read_typed_in_one_module(tmp_path):
    from pathlib import Path

    from services import env
    e = {"TANDEM_API_KEYS": " a, ,b ", "TANDEM_CLUSTER_TOKEN": " ", "TANDEM_MODEL_CACHE": str(tmp_path),
         "TANDEM_DISABLE_KERNELS": "Yes", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert env.api_keys(e) == ("a", "b") and env.cluster_token(e) is None and env.api_key(e) is None
    assert env.model_cache(e) == Path(tmp_path) and env.kernel_cache(e) is None
    assert env.kernels_disabled(e) and env.in_kubernetes(e) and not env.in_kubernetes({})
    assert env.peer_venv({"PEER_VENV": "/v"}) == "/v"
    assert env.allocator({}) == "auto" and env.allocator({"TANDEM_ALLOCATOR": " TCMalloc "}) == "tcmalloc"
    assert env.allocator_reexecuted({"TANDEM_ALLOCATOR_REEXEC": "1"}) and not env.allocator_reexecuted({})
