"""`python -m services.worker --role prefill|decode|colocated ...`: one worker process."""
from __future__ import annotations

import argparse
import asyncio
import sys

from services import log_setup
from services.engine.dtype_policy import AUTO, DTYPE_CHOICES, DTYPE_HELP
from services.engine.queue_order import DEFAULT_AGING_S, DEFAULT_QUEUE_POLICY, QUEUE_POLICIES
from services.transport.selection import SETTINGS
from services.worker.server import WorkerOptions, serve
from services.redis_url import url_argument


def parse_args(argv=None) -> WorkerOptions:
    p = argparse.ArgumentParser(prog="python -m services.worker", description="A Tandem worker")
    p.add_argument("--role", required=True, choices=["prefill", "decode", "colocated"])
    p.add_argument("--model", default="tiny", help="HF model directory or a named model (tiny, small)")
    p.add_argument("--dtype", default=AUTO, choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--device", default="auto", help="auto (CUDA when a GPU is visible, else CPU), cpu or cuda[:N]")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="on CUDA without --num-blocks: size the KV cache to this share of the GPU (e.g. 0.9)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (overrides --kv-memory-gib)")
    p.add_argument("--kv-memory-gib", type=float, default=1.0)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per pinned core)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--queue-policy", default=DEFAULT_QUEUE_POLICY, choices=QUEUE_POLICIES,
                   help="order of the waiting queue: fcfs (arrival) or sjf (shortest predicted work first: the "
                        "router's output-length prediction, priority classes first, with aging)")
    p.add_argument("--queue-aging-s", type=float, default=DEFAULT_AGING_S,
                   help="sjf: a request that waited this long is served in arrival order (bounds its wait)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    p.add_argument("--kv-port", type=int, default=0, help="KV data-plane port (0: a free one)")
    p.add_argument("--kv-advertise-address", default=None, metavar="HOST:PORT",
                   help="KV data-plane address published to other workers (default: the bound --host and "
                        "--kv-port), e.g. the pod IP when binding 0.0.0.0")
    p.add_argument("--kv-transport", default="auto", choices=SETTINGS,
                   help="KV data plane: auto (cuda_ipc on one GPU, nccl between GPUs, tcp otherwise) or one of them; "
                        "both ends of a transfer must agree")
    p.add_argument("--redis", dest="redis_url", default=None, type=url_argument,
                   help="redis://host:port/db (or redis+sentinel://host:port,.../service) for the registry")
    p.add_argument("--cluster", default="default")
    p.add_argument("--instance-id", default=None)
    p.add_argument("--cpu-cores", default="", help="comma-separated cores to pin to, e.g. 0 or 0,1")
    p.add_argument("--lease-ms", type=int, default=30_000, help="how long a decode reservation waits for its KV")
    p.add_argument("--layer-group", type=int, default=2, help="layers per KV push during prefill")
    p.add_argument("--transfer-timeout-s", type=float, default=30.0)
    p.add_argument("--heartbeat-ttl-s", type=float, default=3.0)
    p.add_argument("--heartbeat-interval-s", type=float, default=1.0,
                   help="how often the load report is published (also at once on a state change, and when a "
                        "reservation was refused for room); below --heartbeat-ttl-s")
    p.add_argument("--grace-s", type=float, default=10.0)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics (and /health) over HTTP on --host at this port (0: a free one)")
    log_setup.add_arguments(p)
    p.add_argument("--migration-stop-copy-blocks", type=int, default=2,
                   help="live migration pauses the request once at most this many KV blocks remain to copy")
    p.add_argument("--migration-max-stages", type=int, default=8, help="pre-copy stages before a migration gives up")
    p.add_argument("--max-migrations", type=int, default=1, help="concurrent migrations out of (and into) this instance")
    p.add_argument("--migration-watermark", type=float, default=0.05,
                   help="fraction of KV blocks a migration destination keeps free")
    p.add_argument("--migration-lease-ms", type=int, default=10_000,
                   help="a destination frees a migration reservation the source stops driving after this")
    a = p.parse_args(argv)
    if a.metrics_port is not None and not 0 <= a.metrics_port <= 65535:
        p.error(f"--metrics-port {a.metrics_port}: give a port in 0..65535 (0: a free one)")
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
        queue_policy=a.queue_policy, queue_aging_s=a.queue_aging_s,
        host=a.host, port=a.port, kv_port=a.kv_port,
        kv_advertise_address=a.kv_advertise_address, kv_transport=a.kv_transport, redis_url=a.redis_url,
        cluster=a.cluster, instance_id=a.instance_id, cpu_cores=cores, lease_ms=a.lease_ms,
        layer_group=a.layer_group, transfer_timeout_s=a.transfer_timeout_s, heartbeat_ttl_s=a.heartbeat_ttl_s,
        heartbeat_interval_s=a.heartbeat_interval_s, grace_s=a.grace_s, metrics_port=a.metrics_port,
        log_format=a.log_format, log_level=a.log_level,
        migration_stop_copy_blocks=a.migration_stop_copy_blocks,
        migration_max_stages=a.migration_max_stages, max_migrations=a.max_migrations,
        migration_watermark=a.migration_watermark, migration_lease_ms=a.migration_lease_ms)


def main(argv=None) -> int:
    opts = parse_args(argv)
    log_setup.configure("worker", opts.log_format, opts.log_level, instance=opts.instance_id)
    try:
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
