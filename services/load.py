"""The one load record, from the engine to the router: `tandem.v1.LoadReport` (worker.proto).

- The engine thread fills the engine's fields after every loop turn (`EngineThread.load`: blocks,
  running, waiting, queued prefill tokens, step time, prefill rate, priority and head-of-line
  demand, paused).
- The worker adds its own (`Worker.report()`: identity, addresses, state, role, leases,
  reservations, migrations in flight) by merging the two.
- That message is the Redis heartbeat (services/registry.py), the `Stats` answer, the source of
  the worker's /metrics gauges, and what placement, the rescheduler's policy, the role policy and
  the autoscaler read. The simulator's instances carry the same field names, so the functions here
  and the policies take either.

What more than one reader derives from the record is defined here once.
"""
from __future__ import annotations


def used_blocks(load) -> int:
    """Blocks not free: held by requests and reservations (evictable prefix-cache blocks count as free)."""
    return load.total_blocks - load.free_blocks
