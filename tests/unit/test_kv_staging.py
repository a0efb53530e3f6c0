"""Staging buffers: gather/scatter of blocks × layer groups, and their bytes equal the tcp wire payload."""
from __future__ import annotations

import pytest
import torch

from services.transport import KVLayout
from services.transport.paths import block_slice, cache_bytes
from services.transport.staging import as_bytes, gather_blocks, scatter_blocks, staging_shape

BLOCKS, LAYERS, BS, HEADS, DIM = 10, 4, 4, 2, 8


def cache(dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCKS, LAYERS, 2, BS, HEADS, DIM, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids, l0, l1", [([3], 0, LAYERS), ([7, 1, 4], 1, 3), ([0, 9], 3, 4)])
def test_round_trip_into_other_block_ids(dtype, ids, l0, l1):
    src, dst = cache(dtype, 1), cache(dtype, 2)
    before = dst.clone()
    staging = gather_blocks(src, ids, l0, l1)
    assert staging.shape == (len(ids), l1 - l0, 2, BS, HEADS, DIM) and staging.is_contiguous()
    targets = [8, 2, 5][:len(ids)]
    scatter_blocks(dst, targets, l0, l1, staging)
    for s, t in zip(ids, targets):
        assert torch.equal(dst[t, l0:l1], src[s, l0:l1])                     # bitwise
    untouched = torch.ones(BLOCKS, LAYERS, dtype=torch.bool)
    untouched[targets, l0:l1] = False
    assert torch.equal(dst[untouched], before[untouched])                    # nothing else written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staging_bytes_are_the_tcp_wire_payload(dtype):
    kv = cache(dtype)
    layout = KVLayout.of(kv, "m")
    flat = cache_bytes(kv, layout)
    ids, l0, l1 = [6, 0, 3], 1, 3
    wire = b"".join(bytes(flat[block_slice(layout, b, l0, l1)]) for b in ids)
    assert bytes(as_bytes(gather_blocks(kv, ids, l0, l1)).numpy()) == wire


def test_gather_into_a_given_buffer_and_refusals():
    kv = cache()
    out = torch.empty(staging_shape(kv, 2, 0, 2))
    assert gather_blocks(kv, [1, 2], 0, 2, out=out) is out
    assert torch.equal(out, kv[[1, 2], 0:2])
    with pytest.raises(ValueError, match="does not fit"):
        gather_blocks(kv, [1], 0, 2, out=out)
    with pytest.raises(ValueError, match="out of range"):
        gather_blocks(kv, [BLOCKS], 0, 1)
    with pytest.raises(ValueError, match=r"layers \[2, 2\)"):
        gather_blocks(kv, [0], 2, 2)
    with pytest.raises(ValueError, match="repeat"):
        scatter_blocks(kv, [1, 1], 0, 2, out)
    with pytest.raises(ValueError, match="does not fit"):
        scatter_blocks(kv, [1, 2], 0, 2, out.to(torch.bfloat16))
