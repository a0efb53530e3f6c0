"""Pre-packed (oneDNN) linear layers compute what F.linear computes, at any row count."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.engine.linear import PrepackedLinear, prepack_linears, prepack_supported

pytestmark = pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.float32)[0],
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 7, 33, 300])
def test_prepacked_matches_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)
    y = PrepackedLinear(w)(x)
    assert y.shape == (rows, 96) and y.dtype == dtype
    ref = F.linear(x.float(), w.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.float(), ref, atol=tol * 10, rtol=tol)


def test_prepack_swaps_bias_free_linears_only():
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=True))
    x = torch.randn(3, 8)
    before = model(x)
    assert prepack_linears(model) == 1
    assert isinstance(model[0], PrepackedLinear) and isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_prepack_supported_says_why_not():
    ok, why = prepack_supported(torch.device("cpu"), torch.float16)
    assert not ok and "float16" in why
    ok, why = prepack_supported(torch.device("cuda"), torch.float32)
    assert not ok and "CPU" in why
