"""The decode gemv (C++ kernel where it builds, torch.mv otherwise) equals plain matmuls."""

import warnings

import pytest
import torch
from torch import nn

from moekit import kernels
from moekit.experts.segment_mm import segment_mm
from moekit.layers.linear import Linear


@pytest.mark.parametrize(
    "shape,ids", [((16, 96, 40), [3, 3, 0, 15]), ((8, 1030, 1027), [7, 2, 4]), ((16, 1024, 389), [5, 0, 5])]
)
def test_gather_gemv_matches_matmul(shape, ids):
    """The small case takes torch.mv; the large ones (4+ MB, odd widths for the vector tail) the kernel: each
    thread's run of rows as four streams, split inside a task, and the last rows of an odd count one at a time."""
    w, x = torch.randn(*shape), torch.randn(len(ids), shape[2])
    ref = torch.stack([w[e] @ x[r] for r, e in enumerate(ids)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no compiler here: the fallback is what is being tested
        y = kernels.gather_gemv(w, ids, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_kernel_builds_here():
    """CI machines have a compiler and ninja: the kernel must build, or decode loses half its speed silently."""
    assert kernels.kernel_available()


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


# weight rows of a page or more; shorter; over two pages (in chunks: of 896, and of 688 with a last one of 675, past
# the 8-wide vectors)
@pytest.mark.parametrize("width", [1029, 389, 3584, 2051])
@pytest.mark.parametrize("n_len", [203, 194])
def test_tiled_segment_kernel_matches_matmul_on_every_edge(width, n_len, monkeypatch):
    """Row counts around the four streams (up to 8 rows), the 3-row tiles, the 1, 2, 4 and 8 tiles that prefetch
    and the 48-row passes; weight row counts no multiple of the 4-column tiles or the 96-column work items (the last
    item four streams of 2 rows and 3 rows alone, or 2 rows alone); an input width with a tail past the 8-wide
    vectors."""
    monkeypatch.setattr(kernels.build, "MIN_KERNEL_BYTES", 0)
    torch.manual_seed(0)
    counts = [1, 2, 3, 4, 0, 5, 7, 8, 9, 12, 22, 47, 48, 49, 97, 192]
    w, x = torch.randn(len(counts), n_len, width), torch.randn(sum(counts), width)
    segments, start = [], 0
    for e, c in enumerate(counts):
        segments.append((e, start, c))
        start += c
    y = torch.full((x.shape[0], n_len), float("nan"))
    assert kernels.segment_gemm(w, x, segments, y)  # the kernel took it
    ref = torch.cat([x[a : a + c].double() @ w[e].double().t() for e, a, c in segments])
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("k_len,width", [(3, 1029), (35, 389), (203, 1029)])
def test_input_major_segment_kernel_matches_matmul_on_every_edge(threads, k_len, width, monkeypatch):
    """y = x @ w[e] for w [E, K, N]: row counts around the two-row tiles, weight rows around the four-row groups
    and 16-row blocks (3: no group at all; 35 and 203: a tail), output widths past the 8-wide vectors and the
    256-float stretches, segments the threads' runs share (summed afterwards) or not, and the same answer, bit for
    bit, on every call with the same threads."""
    monkeypatch.setattr(kernels.build, "MIN_KERNEL_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    counts = [1, 2, 3, 0, 5, 16, 1, 2, 31, 32]
    assert max(counts) == 32  # the most rows the kernel takes (csrc kInputMajorRows; MKL beyond on any CPU)
    w, x = torch.randn(len(counts), k_len, width), torch.randn(sum(counts), k_len)
    segments, start = [], 0
    for e, c in enumerate(counts):
        segments.append((e, start, c))
        start += c
    y = torch.full((x.shape[0], width), float("nan"))
    assert kernels.segment_gemm_input_major(w, x, segments, y)
    ref = torch.cat([x[a : a + c] @ w[e] for e, a, c in segments])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    again = torch.empty_like(y)
    kernels.segment_gemm_input_major(w, x, segments, again)
    assert torch.equal(y, again)


@pytest.mark.parametrize("width", [1000, 1029])  # streaming stores, a column tail; unaligned rows, plain stores
def test_weight_gradient_kernel_matches_matmul(width):
    """Segments of 0 (zeros), 1, 2, 5, 16, 49 and 192 rows, dw rows past the 3-row tiles and 48-row items, columns
    past the 32-wide panels; every element of dw written."""
    torch.manual_seed(0)
    counts = [0, 1, 2, 5, 16, 49, 192, 0]
    x, dy = torch.randn(sum(counts), width), torch.randn(sum(counts), 203)
    segments, start = [], 0
    for e, c in enumerate(counts):
        segments.append((e, start, c))
        start += c
    dw = torch.full((len(counts), 203, width), float("nan"))
    assert kernels.segment_grad_weight(x, dy, segments, dw)
    ref = torch.stack([dy[a : a + c].t() @ x[a : a + c] for _, a, c in segments])
    torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("transposed", [False, True])  # [E, N, K] weights; input-major [E, K, N] (GPT-OSS, Llama 4)
def test_segment_mm_with_every_kernel_matches_autograd(transposed):
    """Kernel-sized weights, segments for each path: none, short (weight-gradient kernel, input-major kernel),
    tiled, and MKL."""
    torch.manual_seed(0)
    counts = [0, 3, 16, 17, 100, 200, 0, 1]
    w = (torch.randn((8, 1024, 256) if transposed else (8, 256, 1024)) * 0.02).requires_grad_()
    x = torch.randn(sum(counts), 1024, requires_grad=True)
    dy = torch.randn(sum(counts), 256)
    y = segment_mm(x, w, counts, transposed=transposed)
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    ref = torch.cat(
        [x[a : a + c] @ (w[e] if transposed else w[e].t()) for e, (a, c) in enumerate(zip(starts, counts, strict=True))]
    )
    rx, rw = torch.autograd.grad(ref, [x, w], dy)
    for got, want in ((y, ref), (gx, rx), (gw, rw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [96, 2048])  # below the kernel's size (torch.mv), and 8 MB (the kernel)
def test_gather_gemv_takes_id_tensors_and_one_shared_row(rows):
    """The decode path passes the router's id tensor and one token row expanded (stride 0) to its k experts."""
    w, x = torch.randn(4, rows, 1024), torch.randn(1, 1024)
    ids = torch.tensor([2, 0, 3])
    y = kernels.gather_gemv(w, ids, x.expand(3, -1))
    torch.testing.assert_close(y, torch.stack([w[e] @ x[0] for e in (2, 0, 3)]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [64, 1027])  # 0.75 MB in all (torch.mv) and 9 MB (the kernel, odd width)
def test_linear_gemv_runs_several_layers_in_one_pass(width):
    weights = [torch.randn(n, width) for n in (1024, 512, 768)]
    x = torch.randn(width)
    for y, w in zip(kernels.linear_gemv(weights, x), weights, strict=True):
        torch.testing.assert_close(y, w @ x, rtol=1e-5, atol=1e-4)


def test_stale_build_lock_is_removed(tmp_path):
    """torch waits forever on the `lock` file a killed build leaves; moekit's OS lock knows it is stale."""
    (tmp_path / "lock").touch()
    with pytest.warns(UserWarning, match="lock an interrupted build left"), kernels.build._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stale lock: nothing to say
        with kernels.build._build_lock(tmp_path):
            pass


def test_build_directory_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNEL_DIR", str(tmp_path))
    path = kernels.build._build_directory()
    assert path.parent == tmp_path and path.is_dir() and torch.__version__.split("+")[0] in path.name


def test_large_weights_live_in_huge_pages_and_round_trip(tmp_path):
    """Expert stacks of a huge page or more get their own 2 MB aligned mapping (decode streams them); they behave as
    any tensor: initialised, trained, saved with safetensors and loaded back."""
    from safetensors.torch import load_file, save_file

    from moekit.experts import ExpertWeights, huge_pages
    from moekit.experts.layout import ExpertLayout

    experts = ExpertWeights(4, 256, 512, ExpertLayout())  # gate_up 4 MB, down 2 MB
    for p in (experts.gate_up_proj, experts.down_proj):
        assert p.data_ptr() % 2**21 == 0 and 0.015 < p.std() < 0.025  # rehomed, then initialised
    experts.gate_up_proj.sum().backward()
    assert torch.equal(experts.gate_up_proj.grad, torch.ones_like(experts.gate_up_proj))
    small = huge_pages.empty((100,), torch.float32)  # under a huge page: plain torch.empty
    assert small.shape == (100,)
    path = tmp_path / "w.safetensors"
    save_file({"w": experts.gate_up_proj.detach()}, str(path))
    assert torch.equal(load_file(str(path))["w"], experts.gate_up_proj.detach())


def test_read_probe_sums_every_element():
    from moekit.kernels.probe import read_probe

    for n in (1, 31, 1000, 2**20 + 7):  # shares, quarters and tails of every size
        x = torch.rand(n)
        assert read_probe(x) == pytest.approx(float(x.double().sum()), rel=1e-5)
