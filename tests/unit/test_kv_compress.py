"""Compressed preemption (issue 16, items 2-3): the int8 round trip, the store's byte accounting,
the cost model's choice, and the scheduler's saves and restores with exact block accounting."""
from __future__ import annotations

import pytest
import torch

from services.engine.config import SchedulerConfig
from services.engine.kv_cache import KVCacheManager
from services.engine.kv_compress import (CompressedStore, compress_blocks, compressed_bytes_per_block,
                                         restore_blocks)
from services.engine.preemption import COMPRESS, RECOMPUTE, PreemptionCosts
from services.engine.request import RequestStatus
from services.engine.scheduler import Scheduler
from tests.unit.test_scheduler import req, step

L, BS, H, D = 3, 4, 2, 8      # layers, block size, kv heads, head dim of the tensors below


def _kv(num_blocks: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, L, 2, BS, H, D, generator=g)       # [n, L, 2, bs, H, D]
    kv[..., 3] *= 40.0                                                # an outlier channel, as K has
    return kv.to(dtype)


# ---------------------------------------------------------------- the int8 round trip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_within_half_a_step_of_each_token_heads_scale(dtype):
    kv = _kv(6, dtype)
    data = compress_blocks(kv, [4, 1, 2])
    assert data.q.dtype == torch.int8 and data.q.shape == (3, L, 2, BS, H, D)
    assert data.scale.shape == (3, L, 2, BS, H, 1)
    assert data.nbytes == 3 * compressed_bytes_per_block(L, BS, H, D)
    out = torch.zeros_like(kv)
    restore_blocks(out, data, [0, 3, 5])
    for src, dst in ((4, 0), (1, 3), (2, 5)):
        x, y = kv[src].float(), out[dst].float()
        step_ = x.abs().amax(dim=-1, keepdim=True) / 127                # one step of that token-head's scale
        slack = 0.5 * step_ + (x.abs() * 2 ** -7 if dtype == torch.bfloat16 else 0)   # + bf16 rounding
        assert torch.all((x - y).abs() <= slack + 1e-6)
    assert torch.count_nonzero(out[[1, 2, 4]]) == 0                   # nothing else written


def test_restore_skips_blocks_the_prefix_cache_gave_back():
    kv = _kv(4)
    data = compress_blocks(kv, [0, 1, 2])
    out = torch.zeros_like(kv)
    restore_blocks(out, data, [3], skip=2)                           # block 2 of the copy only
    assert torch.allclose(out[3], kv[2], atol=kv[2].abs().max().item() / 127)
    with pytest.raises(ValueError, match="only 3 were compressed"):
        restore_blocks(out, data, [0, 1], skip=2)


# ---------------------------------------------------------------- the store
def test_store_counts_bytes_from_reserve_to_take_or_drop():
    store = CompressedStore(budget_bytes=1000, bytes_per_block=300)
    assert store.reserve("a", 2, 7) and store.bytes_used == 600
    assert not store.reserve("a", 1, 3)                    # one copy per request
    assert not store.reserve("b", 2, 5)                    # 1200 > 1000
    assert store.reserve("b", 1, 4) and store.bytes_used == 900 and len(store) == 2
    assert not store.room_for(1)
    data = compress_blocks(_kv(2), [0, 1])
    store.fill("a", data)
    with pytest.raises(ValueError, match="2 blocks compressed, 1 reserved"):
        store.fill("b", data)
    assert store.num_tokens("a") == 7 and store.num_tokens("zz") == 0
    tokens, got = store.take("a")
    assert tokens == 7 and got is data and store.bytes_used == 300 and "a" not in store
    store.drop("b")
    store.drop("b")                                        # idempotent
    assert store.bytes_used == 0 and len(store) == 0
    store.fill("b", data)                                  # dropped meanwhile: discarded
    assert len(store) == 0


# ---------------------------------------------------------------- the cost model
def test_choice_by_mode_room_and_measured_cost():
    assert PreemptionCosts("recompute").choose(64, 4, True) == RECOMPUTE
    c = PreemptionCosts("compress")
    assert c.choose(64, 4, True) == COMPRESS
    assert c.choose(64, 4, False) == RECOMPUTE and c.no_room == 1
    assert c.choose(0, 0, True) == RECOMPUTE                # nothing computed: nothing to keep
    a = PreemptionCosts("auto")
    assert a.choose(64, 4, True) == RECOMPUTE               # unmeasured: the exact way
    a.rates.observe(0.1, 1000, 0)                           # prefill 10,000 tokens/s: 64 tokens = 6.4 ms
    a.observe_copy(4, 0.002, 4, 0.002)                      # 1 ms a block out and back: 4 blocks = 4 ms
    assert a.copy_s_per_block == pytest.approx(0.001)
    assert a.choose(64, 4, True) == COMPRESS
    assert a.choose(40, 4, True) == RECOMPUTE               # 4.0 ms of prefill is not dearer than 4 ms of copy
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        PreemptionCosts("swap")


# ---------------------------------------------------------------- the scheduler
def _sched(mode: str, *, num_blocks: int = 7, budget_blocks: int = 8, prefix: bool = False) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=prefix)
    store = CompressedStore(budget_blocks * 100, 100)
    return Scheduler(SchedulerConfig(preemption_mode=mode), kv, 1024, kv_store=store)


def _check(s: Scheduler) -> None:
    s.kv.check_integrity()
    waiting = {r.request_id for r in s.waiting}
    assert set(s.kv_store.ids()) <= waiting
    assert s.kv_store.bytes_used == 100 * sum(s.kv_store.entry_bytes(r) // 100 for r in s.kv_store.ids())


def test_compressed_victim_saves_its_blocks_and_comes_back_without_recomputing():
    s = _sched("compress")
    a, b, c = req("a", 8, 0.0, max_tokens=3), req("b", 8, 1.0, max_tokens=6), req("c", 8, 2.0, max_tokens=3)
    for r in (a, b, c):
        s.add(r)
    step(s, {"a": 10, "b": 20, "c": 30})
    c_blocks = s.kv.block_table("c")
    out, _, shape = step(s, {"a": 11, "b": 21})
    assert out.preempted == ["c"] and s.preemption.counts == {RECOMPUTE: 0, COMPRESS: 1}
    (save,) = out.kv_saves
    assert save.request_id == "c" and save.block_ids == c_blocks[:2]      # 8 computed tokens: 2 blocks
    assert s.kv_store.num_tokens("c") == 8 and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert not s.kv.has_request("c") and c.status == RequestStatus.PREEMPTED
    _check(s)
    out, finished, _ = step(s, {"a": 12, "b": 22})
    assert [r.request_id for r in finished] == ["a"] and not out.kv_restores
    # a's blocks are free: c comes back with its 8 tokens restored and decodes its 9th at once
    out, _, shape = step(s, {"b": 23, "c": 31})
    (restore,) = out.kv_restores
    assert restore.request_id == "c" and restore.skip == 0 and restore.block_ids == s.kv.block_table("c")[:2]
    assert shape == {"decodes": [("b", 1), ("c", 1)], "prefills": []}
    assert c.num_computed_tokens == 9 and "c" not in s.kv_store and s.preemption.restored == 1
    _check(s)
    while s.num_unfinished:
        step(s)
        _check(s)
    assert c.output_token_ids[:2] == [30, 31] and len(c.output_token_ids) == 3
    assert s.kv.num_used_blocks == 0 and len(s.kv_store) == 0 and s.kv_store.bytes_used == 0


def test_no_room_in_the_store_means_recompute():
    s = _sched("compress", budget_blocks=1)              # c's 2 blocks do not fit
    a, b, c = req("a", 8, 0.0, max_tokens=3), req("b", 8, 1.0, max_tokens=6), req("c", 8, 2.0, max_tokens=3)
    for r in (a, b, c):
        s.add(r)
    step(s)
    out, _, _ = step(s)
    assert out.preempted == ["c"] and not out.kv_saves
    assert s.preemption.counts == {RECOMPUTE: 1, COMPRESS: 0} and s.preemption.no_room == 1
    while s.num_unfinished:
        step(s)
    _check(s)


def test_a_compressed_request_that_ends_while_waiting_leaves_nothing():
    s = _sched("compress")
    a, b, c = req("a", 8, 0.0, max_tokens=3), req("b", 8, 1.0, max_tokens=6), req("c", 8, 2.0, max_tokens=3)
    for r in (a, b, c):
        s.add(r)
    step(s)
    step(s)
    assert "c" in s.kv_store
    from services.engine.request import FinishReason
    s.finish("c", FinishReason.ABORT)
    assert "c" not in s.kv_store and s.kv_store.bytes_used == 0
    while s.num_unfinished:
        step(s)
    _check(s)
    assert s.kv.num_used_blocks == 0


def test_restored_blocks_are_not_offered_as_exact_prefix_cache():
    s = _sched("compress", prefix=True)
    a, b, c = req("a", 8, 0.0, max_tokens=3), req("b", 8, 1.0, max_tokens=6), req("c", 9, 2.0, max_tokens=8)
    for r in (a, b, c):
        s.add(r)
    step(s)          # c's first 2 blocks are full and hashed: they stay cached (evictable) after it is preempted
    out, _, _ = step(s)
    assert out.preempted == ["c"] and s.kv_store.num_tokens("c") == 9
    step(s)          # a finishes
    out, _, shape = step(s)
    (restore,) = out.kv_restores
    # c's first block came back from the prefix cache (exact); its second was evicted for b: restored
    assert restore.skip == 1 and restore.block_ids == s.kv.block_table("c")[1:3]
    while c.num_computed_tokens < 12:
        step(s)
    # full blocks from the restore point on hold KV computed over lossy KV: none of them got a hash
    assert not c.is_finished and all(s.kv._block_hash[b] is None for b in s.kv.block_table("c")[1:])
    assert s.kv._block_hash[s.kv.block_table("c")[0]] is not None
    while s.num_unfinished:
        step(s)
    _check(s)
