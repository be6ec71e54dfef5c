"""moekit's one-pass SwiGLU kernel (moekit.kernels.swiglu) against torch's silu(gate) * up, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from moekit import kernels
from moekit.experts.layout import ExpertLayout, apply_activation
from moekit.kernels.swiglu import swiglu

pytestmark = pytest.mark.skipif(not kernels.kernel_available(), reason="no C++ compiler: torch's ops only")


@pytest.mark.parametrize("f", [256, 261])  # 261: the scalar tail after the 8-wide lanes
def test_kernel_matches_torch(f):
    rows = kernels.MIN_KERNEL_BYTES // (2 * f * 4) + 1  # just large enough for the kernel to take
    g = torch.Generator().manual_seed(0)
    h_SX = (torch.randn(rows, 2 * f, generator=g) * 4).requires_grad_()
    with torch.no_grad():
        h_SX[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 90.0, 200.0])  # exp's clamped ends
    da_SF = torch.randn(rows, f, generator=g)

    a_SF = swiglu(h_SX)
    assert a_SF is not None, "the kernel should take fp32 rows of this size"
    gate, up = h_SX.chunk(2, dim=-1)
    ref_SF = F.silu(gate) * up
    torch.testing.assert_close(a_SF, ref_SF, rtol=1e-5, atol=1e-5)
    (got,) = torch.autograd.grad(a_SF, h_SX, da_SF)
    (want,) = torch.autograd.grad(ref_SF, h_SX, da_SF)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_apply_activation_takes_the_kernel_only_where_it_can():
    h_SX = torch.randn(4096, 512)
    assert swiglu(h_SX[:, :300]) is None  # not contiguous
    assert swiglu(h_SX[:8]) is None  # too small to be worth a kernel call
    assert swiglu(h_SX.double()) is None
    layout = ExpertLayout()
    torch.testing.assert_close(apply_activation(h_SX, layout), F.silu(h_SX[:, :256]) * h_SX[:, 256:])
