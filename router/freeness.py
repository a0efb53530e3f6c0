"""Llumnix freeness, the one formula placement and the rescheduler share: free KV blocks per request.

    freeness(free_blocks, requests) = free_blocks / max(1, requests)

Higher is freer; negative once free_blocks is (demand beyond what is free). The two callers
differ only in what they count, on purpose:

- placement (router/request/placement.py) asks "where does a NEW request fit best": free_blocks = the
  report's free blocks less the blocks already promised to requests in flight to it; requests =
  running + waiting + in flight (every request that will compete for those blocks).
- the migration policy (router/migration/policy.py) asks "which instance is under pressure":
  free_blocks = total − virtual usage (used + head-of-line waiting demand + high-priority headroom +
  pending defrag demand), so waiting work is already charged in blocks; requests = running only.
  A draining instance is −inf there (a rule of the policy, not of this formula).
"""
from __future__ import annotations


def freeness(free_blocks: float, requests: int) -> float:
    """free_blocks / max(1, requests); see the module docstring for what each caller counts."""
    return free_blocks / max(1, requests)
