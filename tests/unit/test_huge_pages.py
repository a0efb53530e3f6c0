"""huge_pages.zeros: a plain zero tensor to every caller, on 2 MiB pages where the kernel allows it."""
from __future__ import annotations

import pytest
import torch

from services.engine import huge_pages


@pytest.mark.parametrize("text,mode", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("garbage\n", "unavailable"),
])
def test_thp_mode_reads_the_bracketed_policy(tmp_path, text, mode):
    f = tmp_path / "enabled"
    f.write_text(text)
    assert huge_pages.thp_mode(f) == mode


def test_thp_mode_without_the_file_is_unavailable(tmp_path):
    assert huge_pages.thp_mode(tmp_path / "missing") == "unavailable"


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32),                  # under one huge page
                                         ((70, 2, 2, 16, 8, 64), torch.bfloat16),  # 4.4 MiB, not a multiple
                                         ((1 << 20, 3), torch.float32)])
def test_zeros_is_a_contiguous_zero_tensor(shape, dtype):
    t = huge_pages.zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert not t.any()
    t.fill_(1)   # every byte writable, none shared with another tensor
    assert int(t.sum()) == t.numel()


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of this process's mapping that holds `address`."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(huge_pages.thp_mode() not in ("always", "madvise"),
                    reason="this host's kernel has transparent huge pages off (or no such policy file)")
def test_a_large_tensor_lands_on_huge_pages():
    t = huge_pages.zeros((16 << 20,), torch.float32)   # 64 MiB
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    assert _anon_huge_kb(t.data_ptr()) > 0
