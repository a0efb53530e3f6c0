"""NcclLink on one GPU: a self send/recv inside one group moves blocks through the staging
buffers bit for bit between two caches, and touches nothing else. Skipped without a GPU or
without CuPy's NCCL (conftest.py)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.nccl, pytest.mark.timeout(300)]

# kv: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
SHAPE = (24, 6, 2, 16, 4, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_self_send_recv_in_a_group_moves_blocks_bitwise(dtype):
    from services.transport.nccl_link import NcclLink

    device = torch.device("cuda", 0)
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(SHAPE, generator=g, device=device).to(dtype)
    dst = torch.full(SHAPE, -7.0, device=device, dtype=dtype)
    before = dst.clone()
    src_ids, dst_ids = [3, 0, 17, 9, 22], [11, 4, 5, 20, 1]
    l0, l1 = 2, 5
    torch.cuda.synchronize()                      # src is written on the default stream

    link = NcclLink(NcclLink.new_unique_id(), 1, 0, device)
    try:
        with link.group():
            link.send_blocks(src, src_ids, l0, l1, peer=0)
            link.recv_blocks(dst, dst_ids, l0, l1, peer=0)
        link.synchronize(timeout_s=60)
    finally:
        link.close()
    torch.cuda.synchronize()

    for s, d in zip(src_ids, dst_ids):            # bitwise: compare the raw bytes
        assert torch.equal(dst[d, l0:l1].view(torch.uint8), src[s, l0:l1].view(torch.uint8)), (s, d)
    untouched = torch.ones(SHAPE[:2], dtype=torch.bool, device=device)
    untouched[torch.tensor(dst_ids, device=device)[:, None], torch.arange(l0, l1, device=device)[None, :]] = False
    assert torch.equal(dst[untouched].view(torch.uint8), before[untouched].view(torch.uint8))
    # other layers of the written blocks stay as they were
    assert torch.equal(dst[dst_ids, :l0], before[dst_ids, :l0]) and torch.equal(dst[dst_ids, l1:], before[dst_ids, l1:])


def test_two_groups_in_sequence_and_abort_makes_the_link_unusable():
    from services.transport.nccl_link import NcclLink

    device = torch.device("cuda", 0)
    src = torch.arange(2 * 4 * 2 * 8 * 2 * 16, device=device, dtype=torch.float32).view(2, 4, 2, 8, 2, 16)
    dst = torch.zeros_like(src)
    torch.cuda.synchronize()
    link = NcclLink(NcclLink.new_unique_id(), 1, 0, device)
    try:
        for layers in ((0, 2), (2, 4)):           # layer group by layer group, as a prefill pushes
            with link.group():
                link.send_blocks(src, [1, 0], *layers, peer=0)
                link.recv_blocks(dst, [0, 1], *layers, peer=0)
        link.synchronize(timeout_s=60)
        assert torch.equal(dst[0], src[1]) and torch.equal(dst[1], src[0])
        link.abort()
        with pytest.raises(ConnectionError):
            link.send_blocks(src, [0], 0, 1, peer=0)
    finally:
        link.close()
