"""The decode gemv (C++ kernel where it builds, torch.mv otherwise) equals plain matmuls."""

import warnings

import pytest
import torch
from torch import nn

from moekit.experts import gemv
from moekit.experts.segment_mm import segment_mm
from moekit.layers.linear import Linear


@pytest.mark.parametrize("shape,ids", [((16, 96, 40), [3, 3, 0, 15]), ((8, 1024, 1027), [7, 2])])
def test_gather_gemv_matches_matmul(shape, ids):
    """The small case takes torch.mv; the large one (4+ MB, odd width for the vector tail) the kernel."""
    w, x = torch.randn(*shape), torch.randn(len(ids), shape[2])
    ref = torch.stack([w[e] @ x[r] for r, e in enumerate(ids)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no compiler here: the fallback is what is being tested
        y = gemv.gather_gemv(w, ids, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_kernel_builds_here():
    """CI machines have a compiler and ninja: the kernel must build, or decode loses half its speed silently."""
    assert gemv.kernel_available()


def test_decode_segment_mm_and_linear_equal_training_path():
    torch.manual_seed(0)
    w = torch.randn(64, 768, 1024) * 0.02
    counts = [0] * 64
    for e in (1, 9, 33, 60):
        counts[e] = 1
    x = torch.randn(4, 1024)
    with torch.no_grad():
        fast = segment_mm(x, w, counts)
    slow = segment_mm(x.requires_grad_(), w, counts).detach()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    lin, ref = Linear(1024, 4096), nn.Linear(1024, 4096)
    ref.load_state_dict(lin.state_dict())
    row = torch.randn(1, 1, 1024)
    with torch.no_grad():
        torch.testing.assert_close(lin(row), ref(row), rtol=1e-5, atol=1e-5)
