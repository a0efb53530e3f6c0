"""`python -m services.worker --role prefill|decode|colocated ...`: one worker process."""
from __future__ import annotations

import sys

if __name__ == "__main__":        # before torch is imported: the allocator must be there first
    from services.allocator import use_tcmalloc
    use_tcmalloc()

import argparse  # noqa: E402
import asyncio  # noqa: E402

from services import log_setup
from services.engine.settings import EngineSettings
from services.member_tls import member_tls
from services.redis_url import url_argument
from services.settings import add_flags, help_of
from services.worker.server import WorkerOptions, serve
from services.worker.settings import WorkerSettings


def parse_args(argv=None) -> WorkerOptions:
    p = argparse.ArgumentParser(prog="python -m services.worker", description="A Tandem worker")
    p.add_argument("--role", required=True, choices=["prefill", "decode", "colocated"])
    add_flags(p, EngineSettings, "model", "dtype", "device", "gpu_memory_utilization", "block_size", "num_blocks",
              "kv_memory_gib", "max_num_batched_tokens", "max_num_seqs", "max_model_len", "threads")
    p.add_argument("--no-prefix-caching", action="store_true", help=help_of(EngineSettings, "enable_prefix_caching"))
    add_flags(p, EngineSettings, "queue_policy", "queue_aging_s", "displace_ratio", "mixed_prefill", "preemption_mode",
              "kv_compress_fraction")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    p.add_argument("--kv-port", type=int, default=0, help="KV data-plane port (0: a free one)")
    p.add_argument("--kv-advertise-address", default=None, metavar="HOST:PORT",
                   help="KV data-plane address published to other workers (default: the bound --host and "
                        "--kv-port), e.g. the pod IP when binding 0.0.0.0")
    add_flags(p, WorkerSettings, "kv_transport")
    p.add_argument("--redis", dest="redis_url", default=None, type=url_argument,
                   help="redis://host:port/db (or redis+sentinel://host:port,.../service) for the registry")
    p.add_argument("--cluster", default="default")
    p.add_argument("--instance-id", default=None)
    p.add_argument("--cpu-cores", default="", help="comma-separated cores to pin to, e.g. 0 or 0,1")
    add_flags(p, WorkerSettings, "lease_ms", "layer_group", "transfer_timeout_s", "heartbeat_ttl_s",
              "heartbeat_interval_s", "grace_s", "orphan_grace_s")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics (and /health) over HTTP on --host at this port (0: a free one)")
    log_setup.add_arguments(p)
    add_flags(p, WorkerSettings, "migration_stop_copy_blocks", "migration_max_stages", "max_migrations",
              "migration_watermark", "migration_lease_ms")
    a = p.parse_args(argv)
    if a.metrics_port is not None and not 0 <= a.metrics_port <= 65535:
        p.error(f"--metrics-port {a.metrics_port}: give a port in 0..65535 (0: a free one)")
    if not a.orphan_grace_s >= 0:
        p.error(f"--orphan-grace-s {a.orphan_grace_s}: give a number of seconds >= 0 (0: off)")
    if not (a.displace_ratio == 0 or a.displace_ratio >= 1):
        p.error(f"--displace-ratio {a.displace_ratio}: give a ratio >= 1, or 0 to never displace")
    if not a.queue_aging_s > 0:
        p.error(f"--queue-aging-s {a.queue_aging_s}: give a positive number of seconds")
    if a.gpu_memory_utilization is not None and not 0 < a.gpu_memory_utilization <= 1:
        p.error(f"--gpu-memory-utilization {a.gpu_memory_utilization}: give a share in (0, 1], e.g. 0.9")
    if a.kv_advertise_address is not None:
        host, _, port = a.kv_advertise_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            p.error(f"--kv-advertise-address {a.kv_advertise_address!r}: give HOST:PORT with a port in 1..65535, "
                    f"e.g. 10.0.0.7:7100")
    try:
        cores = tuple(int(c) for c in a.cpu_cores.split(",") if c.strip())
    except ValueError:
        p.error(f"--cpu-cores {a.cpu_cores!r}: give comma-separated core numbers, e.g. 0,1")
    return WorkerOptions(
        role=a.role, model=a.model, dtype=a.dtype, device=a.device, gpu_memory_utilization=a.gpu_memory_utilization,
        block_size=a.block_size, num_blocks=a.num_blocks,
        kv_memory_gib=a.kv_memory_gib, max_num_batched_tokens=a.max_num_batched_tokens, max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len, threads=a.threads, enable_prefix_caching=not a.no_prefix_caching,
        queue_policy=a.queue_policy, queue_aging_s=a.queue_aging_s, displace_ratio=a.displace_ratio,
        mixed_prefill=a.mixed_prefill,
        preemption_mode=a.preemption_mode, kv_compress_fraction=a.kv_compress_fraction,
        host=a.host, port=a.port, kv_port=a.kv_port,
        kv_advertise_address=a.kv_advertise_address, kv_transport=a.kv_transport, redis_url=a.redis_url,
        cluster=a.cluster, instance_id=a.instance_id, cpu_cores=cores, lease_ms=a.lease_ms,
        layer_group=a.layer_group, transfer_timeout_s=a.transfer_timeout_s, heartbeat_ttl_s=a.heartbeat_ttl_s,
        heartbeat_interval_s=a.heartbeat_interval_s, grace_s=a.grace_s, orphan_grace_s=a.orphan_grace_s,
        metrics_port=a.metrics_port, log_format=a.log_format, log_level=a.log_level,
        migration_stop_copy_blocks=a.migration_stop_copy_blocks,
        migration_max_stages=a.migration_max_stages, max_migrations=a.max_migrations,
        migration_watermark=a.migration_watermark, migration_lease_ms=a.migration_lease_ms)


def main(argv=None) -> int:
    opts = parse_args(argv)
    log_setup.configure("worker", opts.log_format, opts.log_level, instance=opts.instance_id)
    try:
        member_tls()                # incomplete TLS settings fail here, before the model loads
        asyncio.run(serve(opts))
    except Exception as e:          # a startup error a user can fix: one line, no traceback
        from services.engine.config import ModelConfigError
        if isinstance(e, (ModelConfigError, ValueError, OSError)):
            print(f"tandem worker: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
