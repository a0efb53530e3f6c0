"""Overload (issue 18, item 4): a burst far past the router's queue bound, started at once through
one AsyncClient, on a tiny 1P+1D cluster. Every request ends served or with RESOURCE_EXHAUSTED
(naming --max-queued-requests, with a retry-after) or UNAVAILABLE, each with a message; nothing
leaks; the router's memory stays bounded; the cluster serves normally right after."""
from __future__ import annotations

import asyncio

import pytest

from benchmarks.overload import burst, rss_mib
from tandem import AsyncClient, Client
from tandem.local_cluster import LocalCluster
from tests.integration.cluster_helpers import assert_no_leaks

pytestmark = pytest.mark.timeout(600)

BURST = 300
MAX_QUEUED = 8
RSS_GROWTH_BOUND_MIB = 256          # generous: a leak of per-request state over 300 requests shows far below


async def _burst(address: str):
    async with AsyncClient(address, max_retries=0) as client:
        return await burst(client, BURST)


def test_a_burst_past_the_queue_bound_ends_every_request_with_a_reason():
    with LocalCluster("tiny", prefill=1, decode=1, pools="fixed",
                      router_args=["--max-queued-requests", str(MAX_QUEUED)]) as cluster:
        router_pid = cluster.procs["router"].pid
        Client(cluster.address).complete(token_ids=[1, 2, 3], max_tokens=4)      # warm: first-use allocations
        rss_before = rss_mib(router_pid)
        outcomes = asyncio.run(_burst(cluster.address))
        rss_after = rss_mib(router_pid)

        assert outcomes.unexplained == [], outcomes.unexplained[:5]
        assert sum(outcomes.counts.values()) == BURST
        assert set(outcomes.counts) <= {"ok", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, outcomes.counts
        assert outcomes.counts["ok"] > 0 and outcomes.counts["RESOURCE_EXHAUSTED"] > 0, outcomes.counts
        assert all(r is not None and r >= 1 for r in outcomes.retry_after), outcomes.retry_after[:5]
        assert rss_after - rss_before < RSS_GROWTH_BOUND_MIB, (rss_before, rss_after)
        assert_no_leaks(cluster.address)
        r = Client(cluster.address).complete(token_ids=[5] * 64, max_tokens=8, ignore_eos=True)
        assert len(r.token_ids) == 8                                   # serving normally after the burst


def test_the_refusal_names_the_flag_and_what_to_do():
    with LocalCluster("tiny", prefill=1, decode=1, pools="fixed", router_args=["--max-queued-requests", "1"]) as c:
        async def go():
            async with AsyncClient(c.address, max_retries=0) as client:
                return await burst(client, 40)
        outcomes = asyncio.run(go())
        assert outcomes.unexplained == [] and outcomes.counts["RESOURCE_EXHAUSTED"] > 0, outcomes.counts
        message = outcomes.first_detail["RESOURCE_EXHAUSTED"]
        assert "--max-queued-requests 1" in message and "retry after" in message, message
        assert_no_leaks(c.address)
