"""Unit tests for services.engine.kv_cache (tiny configs, exact block ids)."""
from __future__ import annotations

import random

import pytest

from services.engine.kv_cache import KVCacheError, KVCacheManager, hash_block

BS = 4


@pytest.fixture
def make():
    """Factory for managers; every manager created is integrity-checked at teardown."""
    created: list[KVCacheManager] = []

    def _make(num_blocks: int = 8, block_size: int = BS, prefix: bool = True) -> KVCacheManager:
        m = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix)
        created.append(m)
        return m

    yield _make
    for m in created:
        m.check_integrity()


def run_prefill(m: KVCacheManager, rid: str, toks: list[int]) -> int:
    """Allocate the whole prompt, 'compute' it and cache full blocks. Returns cached tokens."""
    hit = m.allocate(rid, toks, len(toks))
    assert hit is not None
    m.cache_blocks(rid, toks, len(toks))
    return hit


# ---------------------------------------------------------------- hashing
def test_hash_block_stable_and_chained():
    h = hash_block(None, [1, 2, 3, 4])
    assert h == hash_block(None, [1, 2, 3, 4])
    assert isinstance(h, int) and 0 <= h < 2**64
    assert h == hash_block(0, [1, 2, 3, 4])  # None encodes as 0
    assert h != hash_block(None, [1, 2, 3, 5])
    assert hash_block(h, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])


# ------------------------------------------------------------- allocation
def test_fresh_allocation_exact_ids(make):
    m = make()
    assert m.allocate("a", list(range(10)), 10) == 0
    assert m.block_table("a") == [0, 1, 2]
    assert m.has_request("a") and not m.has_request("b")
    assert (m.num_used_blocks, m.num_free_blocks, m.usage) == (3, 5, 3 / 8)
    assert m.allocate("b", list(range(100, 104)), 4) == 0
    assert m.block_table("b") == [3]


def test_all_or_nothing_failure_leaves_state_unchanged(make):
    m = make(num_blocks=4)
    m.allocate("a", list(range(8)), 8)
    before = (m.block_table("a"), m.num_free_blocks, list(m._free), dict(m._evictable))
    assert m.allocate("b", list(range(50, 62)), 12) is None  # needs 3, only 2 free
    assert not m.has_request("b")
    assert m.allocate("a", list(range(8)), 20) is None  # growth needing 3 more
    assert (m.block_table("a"), m.num_free_blocks, list(m._free), dict(m._evictable)) == before


def test_growth_by_one_block_on_decode_boundary(make):
    m = make()
    toks = list(range(7))
    m.allocate("a", toks, 7)
    assert m.block_table("a") == [0, 1]
    assert m.blocks_needed("a", 8) == 0
    assert m.allocate("a", toks + [7], 8) == 0
    assert m.block_table("a") == [0, 1]
    assert m.blocks_needed("a", 9) == 1
    assert m.allocate("a", toks + [7, 8], 9) == 0
    assert m.block_table("a") == [0, 1, 2]
    assert m.blocks_needed("unknown", 9) == 3


def test_negative_num_tokens_raises(make):
    m = make()
    with pytest.raises(KVCacheError):
        m.allocate("a", [1], -1)


# --------------------------------------------------------- prefix caching
def test_prefix_hit_reuses_exact_ids_and_bumps_refs(make):
    m = make()
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert run_prefill(m, "a", prompt) == 0
    assert m.block_table("a") == [0, 1, 2]
    other = prompt[:8] + [99, 98, 97]
    assert m.find_cached_prefix(other) == 8
    assert m.allocate("b", other, len(other)) == 8
    assert m.block_table("b") == [0, 1, 3]
    assert m._ref[0] == m._ref[1] == 2 and m._ref[2] == m._ref[3] == 1
    assert m.num_used_blocks == 4


def test_leave_one_token_cap(make):
    m = make()
    prompt = list(range(8))  # exactly 2 full blocks
    run_prefill(m, "a", prompt)
    assert m.find_cached_prefix(prompt) == 4  # last block dropped
    assert m.find_cached_prefix(prompt + [1]) == 8
    assert m.find_cached_prefix(prompt[:4]) == 0
    assert m.find_cached_prefix([]) == 0
    assert m.allocate("b", prompt, 8) == 4
    assert m.block_table("b") == [0, 2]


def test_partial_last_block_never_cached(make):
    m = make()
    prompt = list(range(6))
    run_prefill(m, "a", prompt)
    assert m._block_hash[0] is not None and m._block_hash[1] is None
    assert len(m._hash_to_block) == 1
    m.free("a")
    assert list(m._evictable) == [0] and 1 in m._free
    assert m.find_cached_prefix(prompt + [7, 8, 9]) == 4


def test_cache_blocks_idempotent_and_incremental(make):
    m = make()
    toks = list(range(12))
    m.allocate("a", toks, 12)
    m.cache_blocks("a", toks, 3)
    assert m._hash_to_block == {}
    m.cache_blocks("a", toks, 5)
    m.cache_blocks("a", toks, 5)
    assert list(m._hash_to_block.values()) == [0]
    m.cache_blocks("a", toks, 12)
    h0 = hash_block(None, toks[:4])
    h1 = hash_block(h0, toks[4:8])
    assert m._hash_to_block == {h0: 0, h1: 1, hash_block(h1, toks[8:12]): 2}
    m.cache_blocks("unknown", toks, 12)  # no-op
    with pytest.raises(KVCacheError):
        m.cache_blocks("a", toks, 13)


def test_duplicate_hash_keeps_existing_mapping(make):
    m = make()
    prompt = list(range(9))
    m.allocate("a", prompt, 9)
    m.allocate("b", prompt, 9)  # nothing cached yet -> own blocks
    assert m.block_table("b") == [3, 4, 5]
    m.cache_blocks("a", prompt, 9)
    m.cache_blocks("b", prompt, 9)
    assert sorted(m._hash_to_block.values()) == [0, 1]
    m.free("b")
    assert list(m._free)[-3:] == [5, 4, 3] and not m._evictable
    assert m.allocate("c", prompt, 9) == 8
    assert m.block_table("c")[:2] == [0, 1]


def test_free_then_same_prefix_reuses_blocks(make):
    m = make()
    prompt = list(range(10))
    run_prefill(m, "a", prompt)
    m.free("a")
    assert not m.has_request("a") and m.block_table("a") == []
    assert list(m._evictable) == [1, 0]  # reverse order; partial block 2 went to free list
    assert m.num_free_blocks == 8 and m.num_used_blocks == 0
    assert m._ref[0] == m._ref[1] == 0
    assert m.allocate("b", prompt, 10) == 8
    assert m.block_table("b")[:2] == [0, 1] and m._ref[0] == m._ref[1] == 1
    assert not m._evictable


def test_evictable_hit_counts_against_budget(make):
    m = make(num_blocks=3)
    prompt = list(range(9))
    run_prefill(m, "a", prompt)
    m.free("a")  # blocks 0,1 evictable, 2 free
    # needs 3 blocks: 2 cached (evictable) + 1 new -> fits exactly
    assert m.allocate("b", prompt, 9) == 8
    m.free("b")
    # 4 blocks needed (2 cached + 2 new) but only 3 exist -> None, nothing changed
    long = prompt[:8] + list(range(50, 58))
    assert m.allocate("c", long, 16) is None
    assert list(m._evictable) == [1, 0] and not m.has_request("c")


def test_eviction_order_lru_tail_first(make):
    m = make(num_blocks=6)
    pa, pb = list(range(8)), list(range(100, 108))
    run_prefill(m, "a", pa + [1])  # blocks 0,1,2
    run_prefill(m, "b", pb + [1])  # blocks 3,4,5
    m.free("a")  # evictable: 1, 0 ; free: 2
    m.free("b")  # evictable: 1, 0, 4, 3 ; free: 2, 5
    assert list(m._evictable) == [1, 0, 4, 3] and list(m._free) == [2, 5]
    # 4 new blocks: free list first (2, 5), then evict 1 then 0 (a's tail first)
    assert m.allocate("c", list(range(200, 216)), 16) == 0
    assert m.block_table("c") == [2, 5, 1, 0]
    assert list(m._evictable) == [4, 3]
    assert m.find_cached_prefix(pa + [1]) == 0
    assert m.find_cached_prefix(pb + [1]) == 8
    assert m.allocate("d", list(range(300, 304)), 4) == 0
    assert m.block_table("d") == [4]  # tail of b evicted before its head
    assert m.find_cached_prefix(pb + [1]) == 4


def test_hash_chaining_different_parent_no_match(make):
    m = make()
    run_prefill(m, "a", [1, 1, 1, 1, 2, 2, 2, 2, 0])
    # Second block tokens identical, but under a different parent block.
    assert m.find_cached_prefix([9, 9, 9, 9, 2, 2, 2, 2, 0]) == 0
    assert m.find_cached_prefix([1, 1, 1, 1, 3, 3, 3, 3, 0]) == 4
    assert m.find_cached_prefix([2, 2, 2, 2, 0]) == 0


def test_prefix_caching_disabled(make):
    m = make(prefix=False)
    prompt = list(range(10))
    run_prefill(m, "a", prompt)
    assert m._hash_to_block == {} and m.find_cached_prefix(prompt) == 0
    m.free("a")
    assert not m._evictable and list(m._free) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert m.allocate("b", prompt, 10) == 0
    assert m.block_table("b") == [3, 4, 5]


def test_free_unknown_is_noop_and_double_free(make):
    m = make()
    m.free("nope")
    m.allocate("a", [1, 2], 2)
    m.free("a")
    m.free("a")
    assert m.num_free_blocks == 8


def test_reset_prefix_cache(make):
    m = make()
    run_prefill(m, "a", list(range(9)))
    run_prefill(m, "b", list(range(50, 59)))
    m.free("a")
    m.reset_prefix_cache()
    assert not m._evictable and len(m._hash_to_block) == 2  # b's still referenced
    assert m.find_cached_prefix(list(range(9))) == 0
    assert m.find_cached_prefix(list(range(50, 59))) == 8


# -------------------------------------------------------------- integrity
@pytest.mark.parametrize("tamper", [
    lambda m: m._free.append(0),                       # used block also free
    lambda m: m._free.popleft(),                       # block lost
    lambda m: m._ref.__setitem__(0, 2),                # ref count mismatch
    lambda m: m._tables["a"].append(0),                # duplicate in table
    lambda m: m._hash_to_block.__setitem__(123, 3),    # hash map / block hash disagree
    lambda m: m._block_hash.__setitem__(2, 77),        # block hash not in map
    lambda m: m._evictable.__setitem__(5, None),       # evictable w/o hash, also free
])
def test_check_integrity_detects_corruption(tamper):
    m = KVCacheManager(8, BS)
    run_prefill(m, "a", list(range(9)))
    m.check_integrity()
    tamper(m)
    with pytest.raises(KVCacheError):
        m.check_integrity()


def test_check_integrity_evictable_without_hash():
    m = KVCacheManager(4, BS)
    m._free.remove(3)
    m._evictable[3] = None
    with pytest.raises(KVCacheError, match="evictable block 3"):
        m.check_integrity()


# ----------------------------------------------------------------- stress
def test_randomized_stress(make):
    rng = random.Random(1234)
    m = make(num_blocks=24, block_size=BS)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(0, 14))] for _ in range(4)]
    contents: dict[int, list] = {}  # simulated physical block contents
    reqs: dict[str, dict] = {}
    next_id = 0

    def write(rid: str, start: int, end: int) -> None:
        table, toks = m.block_table(rid), reqs[rid]["toks"]
        for p in range(start, end):
            b = table[p // BS]
            assert sum(b in m.block_table(r) for r in reqs) == 1, "writing a shared block"
            contents.setdefault(b, [None] * BS)[p % BS] = toks[p]

    for _ in range(2000):
        op = rng.random()
        if op < 0.3 or not reqs:  # new request
            rid = f"r{next_id}"
            next_id += 1
            toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            expect = m.find_cached_prefix(toks)
            hit = m.allocate(rid, toks, rng.randrange(0, len(toks) + 1))
            if hit is not None:
                assert hit == expect and hit < len(toks)
                for i, b in enumerate(m.block_table(rid)[: hit // BS]):
                    assert contents[b] == toks[i * BS:(i + 1) * BS]
                reqs[rid] = {"toks": toks, "done": hit}
        elif op < 0.8:  # compute a chunk of prefill or one decode token
            rid = rng.choice(sorted(reqs))
            r = reqs[rid]
            if r["done"] == len(r["toks"]):
                r["toks"].append(rng.randrange(50))
            n = rng.randrange(1, len(r["toks"]) - r["done"] + 1)
            if m.allocate(rid, r["toks"], r["done"] + n) is None:
                m.free(rid)  # preempt
                del reqs[rid]
            else:
                assert len(m.block_table(rid)) * BS >= r["done"] + n
                write(rid, r["done"], r["done"] + n)
                r["done"] += n
                m.cache_blocks(rid, r["toks"], r["done"])
        elif op < 0.98:
            rid = rng.choice(sorted(reqs))
            m.free(rid)
            del reqs[rid]
        else:
            m.reset_prefix_cache()
        m.check_integrity()
        assert m.num_used_blocks + m.num_free_blocks == m.num_blocks
    for rid in list(reqs):
        m.free(rid)
    assert m.num_used_blocks == 0
