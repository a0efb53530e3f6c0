"""Prefix-cache events (kv_cache), the router's PrefixIndex, and prefix-aware placement: exact
hashes, exact choices, on tiny fake configs."""
from __future__ import annotations

import random

import pytest

from router.request.placement import InflightLedger, pick_by_prefix, pick_prefill
from router.cluster.prefix_index import PrefixIndex, cached_tokens
from services.engine.kv_cache import KVCacheManager, PrefixEvent, hash_block, prefix_block_hashes
from services.prefix_stream import net_changes, pack_hashes, unpack_hashes
from tandem.v1 import worker_pb2

BS = 4


def prefill(m: KVCacheManager, rid: str, toks: list[int]) -> int:
    hit = m.allocate(rid, toks, len(toks))
    assert hit is not None
    m.cache_blocks(rid, toks, len(toks))
    return hit


def replay(events) -> set[int]:
    held: set[int] = set()
    for e in events:
        (held.add if e.stored else held.discard)(e.block_hash)
    return held


# ------------------------------------------------------------------------- the shared hash chain
def test_prefix_block_hashes_is_the_engines_chain():
    toks = list(range(10, 23))                              # 13 tokens: 3 full blocks of 4
    h = prefix_block_hashes(toks, BS)
    assert h == [hash_block(None, toks[0:4]), hash_block(h[0], toks[4:8]), hash_block(h[1], toks[8:12])]
    assert prefix_block_hashes(toks, BS, max_blocks=1) == h[:1]
    m = KVCacheManager(8, BS)
    m.record_prefix_events()
    prefill(m, "a", toks)
    assert [e.block_hash for e in m.prefix_events] == h      # what the engine registers, in order
    assert m.prefix_snapshot() == (3, sorted(h))


# ------------------------------------------------------------------------------ kv_cache events
def test_no_events_until_asked():
    m = KVCacheManager(4, BS)
    prefill(m, "a", list(range(8)))
    assert m.prefix_events is None
    m.record_prefix_events()
    assert list(m.prefix_events) == [] and m.prefix_snapshot()[0] == 0
    assert len(m.prefix_snapshot()[1]) == 2                   # the snapshot has what was cached before


def test_store_evict_and_reset_events_in_order():
    m = KVCacheManager(4, BS)
    m.record_prefix_events()
    a, b = list(range(8)), list(range(100, 108))
    prefill(m, "a", a)                                       # stores a0, a1
    m.free("a")                                              # evictable, still cached: no event
    ha = prefix_block_hashes(a, BS)
    assert list(m.prefix_events) == [PrefixEvent(1, True, ha[0]), PrefixEvent(2, True, ha[1])]
    prefill(m, "b", b)                                       # 2 free blocks: no eviction
    prefill(m, "c", [7] * 8)                                 # needs 2 more: evicts a's blocks, tail first
    hb, hc = prefix_block_hashes(b, BS), prefix_block_hashes([7] * 8, BS)
    kinds = [(e.stored, e.block_hash) for e in list(m.prefix_events)[2:]]
    assert kinds == [(True, hb[0]), (True, hb[1]), (False, ha[1]), (False, ha[0]), (True, hc[0]), (True, hc[1])]
    m.free("b")
    m.free("c")
    m.reset_prefix_cache()
    assert replay(m.prefix_events) == set() == set(m.prefix_snapshot()[1])
    assert [e.seq for e in m.prefix_events] == list(range(1, len(m.prefix_events) + 1))
    m.check_integrity()


def test_events_replay_to_the_snapshot_under_random_traffic():
    rng = random.Random(3)
    m = KVCacheManager(24, BS)
    m.record_prefix_events()
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(4)]
    live: list[str] = []
    for step in range(400):
        if live and (rng.random() < 0.45 or len(live) > 4):
            m.free(live.pop(rng.randrange(len(live))))
        else:
            toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 14))]
            rid = f"r{step}"
            if m.allocate(rid, toks, len(toks)) is not None:
                m.cache_blocks(rid, toks, len(toks))
                live.append(rid)
            else:
                m.free(rid)
        assert replay(m.prefix_events) == set(m.prefix_snapshot()[1])
    m.check_integrity()


# ---------------------------------------------------------------------------- wire helpers
def test_pack_and_net_changes():
    hs = [0, 1, 2 ** 64 - 1, 12345678901234567]
    assert unpack_hashes(pack_hashes(hs)) == hs and unpack_hashes(b"") == [] and unpack_hashes(None) == []
    with pytest.raises(ValueError):
        unpack_hashes(b"1234567")
    events = [PrefixEvent(1, True, 5), PrefixEvent(2, True, 6), PrefixEvent(3, False, 5), PrefixEvent(4, False, 7),
              PrefixEvent(5, True, 7)]
    assert net_changes(events) == ([6, 7], [5])


# ------------------------------------------------------------------------------ PrefixIndex
def test_index_overlap_counts_leading_blocks_per_instance():
    ix = PrefixIndex()
    ix.replace("a", [1, 2, 3])
    ix.replace("b", [1, 2, 9])
    ix.apply("c", [2, 3], [])
    assert ix.overlap([1, 2, 3, 4]) == {"a": 3, "b": 2}       # c lacks the first block: no credit
    assert ix.overlap([9]) == {"b": 1} and ix.overlap([]) == {} and ix.overlap([4, 1]) == {}
    ix.apply("a", [], [2, 77])                                 # removing an unknown hash is a no-op
    assert ix.overlap([1, 2, 3]) == {"a": 1, "b": 2}
    ix.replace("b", [5])
    assert ix.overlap([1, 2]) == {"a": 1} and ix.hashes("b") == {5}
    ix.drop("a")
    ix.drop("nobody")
    assert ix.instances() == ["b", "c"] and ix.overlap([1]) == {}
    ix.check_integrity()


def test_cached_tokens_leaves_one_token_to_compute():
    toks = list(range(12))                                     # exactly 3 blocks
    h = prefix_block_hashes(toks, BS)
    ix = PrefixIndex()
    ix.replace("a", h)
    memo: dict = {}
    assert cached_tokens(ix, toks, BS, memo) == {"a": 8}        # the engine recomputes the last block
    assert cached_tokens(ix, toks + [5], BS, memo) == {"a": 8}  # memo keyed by block size: same prompt only
    assert cached_tokens(ix, toks + [5], BS) == {"a": 12}


# -------------------------------------------------------------------------------- placement
def rep(instance_id, role=worker_pb2.ROLE_COLOCATED, free=100, total=100, queued=0, rate=1000.0, bs=BS):
    return worker_pb2.LoadReport(instance_id=instance_id, role=role, state="serving", total_blocks=total,
                                 free_blocks=free, queued_prefill_tokens=queued, prefill_tokens_per_s=rate,
                                 block_size=bs)


def test_pick_prefill_credits_cached_tokens():
    ledger = InflightLedger()
    reports = [rep("p0", worker_pb2.ROLE_PREFILL, queued=100), rep("p1", worker_pb2.ROLE_PREFILL)]
    assert pick_prefill(reports, 400, ledger).instance_id == "p1"                       # load only
    # credited_ttft_s: (queued + uncached) / rate - (OVERLAP_WEIGHT - 1) x cached / rate
    assert pick_prefill(reports, 400, ledger, {"p0": 40}).instance_id == "p1"           # 0.46 - 0.04 vs 0.40 s
    assert pick_prefill(reports, 400, ledger, {"p0": 200}).instance_id == "p0"          # 0.30 - 0.20 vs 0.40 s


def test_pick_by_prefix_weighs_overlap_against_queued_work():
    ledger = InflightLedger()
    busy = rep("a", free=60, queued=300)          # 300 prompt tokens queued, 40 blocks held
    idle = rep("b")
    # 400-token prompt at 1000 tokens/s, b: 0.40 s; a caching 160: (300 + 240) / 1000 - 0.16 = 0.38
    assert pick_by_prefix([busy, idle], worker_pb2.ROLE_COLOCATED, 400, 25, ledger, {"a": 160}).instance_id == "a"
    assert pick_by_prefix([busy, idle], worker_pb2.ROLE_COLOCATED, 400, 25, ledger, {"a": 80}).instance_id == "b"
    assert pick_by_prefix([busy, idle], worker_pb2.ROLE_COLOCATED, 400, 61, ledger, {"a": 320}).instance_id == "b"
    token = ledger.add("b", blocks=10, prompt_tokens=40)       # in flight to b: 0.44 s there now
    assert pick_by_prefix([busy, idle], worker_pb2.ROLE_COLOCATED, 400, 25, ledger, {"a": 80}).instance_id == "b"
    assert pick_by_prefix([busy, idle], worker_pb2.ROLE_COLOCATED, 400, 25, ledger, {"a": 150}).instance_id == "a"
    ledger.remove(token)
    # Equal predicted TTFT: the freest wins, then the smaller id.
    twins = [rep("x", free=50), rep("y", free=90), rep("z", free=90)]
    assert pick_by_prefix(twins, worker_pb2.ROLE_COLOCATED, 64, 4, ledger, {}).instance_id == "y"
    assert pick_by_prefix([busy], worker_pb2.ROLE_COLOCATED, 400, 61, ledger, {}) is None
