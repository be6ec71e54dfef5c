"""The shipped quantized formats' reference codecs (moekit/quant/): bytes laid out as the formats define them (hand
cases and transformers' own MXFP4 dequantizer), quantize -> dequantize round trips that are exact on representable
weights, and one-line errors for scales that do not fit."""

import pytest
import torch

from moekit.quant import fp8_blocks, int_pack, mxfp4


def test_mxfp4_bytes_as_gpt_oss_defines_them():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21  # element 0: low nibble 1 (0.5); element 1: high nibble 2 (1.0)
    blocks[0, 0, 1] = 0xF9  # element 2: 9 (-0.5); element 3: 15 (-6)
    w = mxfp4.dequantize(blocks, torch.tensor([[128]], dtype=torch.uint8))  # scale 2^(128 - 127) = 2
    assert w.shape == (1, 32)
    assert w[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0] and w[0, 4:].abs().sum() == 0


def test_mxfp4_equals_transformers_dequantizer():
    transformers_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 10, 4), dtype=torch.uint8, generator=g)
    theirs = transformers_mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, rows]
    assert torch.equal(mxfp4.dequantize(blocks, scales), theirs.transpose(1, 2))


def test_mxfp4_round_trip():
    w = torch.randn(2, 8, 64) * torch.logspace(-3, 2, 8).view(1, 8, 1)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (2, 8, 2, 16) and scales.shape == (2, 8, 2)
    deq = mxfp4.dequantize(blocks, scales)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(deq)), deq)  # representable weights come back exactly
    groups = (deq - w).abs().reshape(2, 8, 2, 32).amax(-1) / w.abs().reshape(2, 8, 2, 32).amax(-1)
    assert float(groups.max()) <= 0.25  # within half the widest code spacing (2 of 6) relative to the group max
    assert mxfp4.BITS_PER_WEIGHT == 4.25


def test_mxfp4_bad_input():
    blocks, scales = torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"experts.0: MXFP4 blocks \[2, 3, 16\] and scales \[2, 4\] do not match"):
        mxfp4.dequantize(blocks, torch.zeros(2, 4, dtype=torch.uint8), name="experts.0")
    with pytest.raises(ValueError, match="scale byte 255"):
        mxfp4.dequantize(blocks, scales.fill_(255))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.randn(4, 40))


def test_fp8_blocks_with_ragged_edges():
    w = torch.randn(200, 300) * 3  # blocks of 128: a [2, 3] grid with ragged last row and column blocks
    q, scale = fp8_blocks.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    deq = fp8_blocks.dequantize(q, scale)
    for i in range(2):  # each block is its e4m3 values times its own scale
        for j in range(3):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            assert torch.equal(deq[rows, cols], q[rows, cols].float() * scale[i, j])
    assert float((deq - w).abs().max() / w.abs().max()) < 2**-4  # e4m3's 3 mantissa bits
    assert torch.equal(fp8_blocks.dequantize(*fp8_blocks.quantize(deq)), deq)


def test_fp8_ue8m0_scales_are_powers_of_two_and_bad_grids_are_named():
    _, scale = fp8_blocks.quantize(torch.randn(4, 130, 256), ue8m0=True)  # a leading (expert) axis too
    assert scale.shape == (4, 2, 2) and torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    q = torch.zeros(576, 300).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"kv_a_proj: scale_inv shape \[4, 3\] does not fit .* allowed \[5, 3\]"):
        fp8_blocks.dequantize(q, torch.ones(4, 3), name="kv_a_proj")
    with pytest.raises(ValueError, match="NaN or inf"):
        fp8_blocks.dequantize(q, torch.full((5, 3), float("inf")))


def test_int4_pack_layout():
    values = torch.tensor([[-8, -1, 0, 1, 2, 3, 7, -3] * 4])  # one row of 32, one group
    word = sum(((v + 8) & 0xF) << (4 * i) for i, v in enumerate(values[0, :8].tolist()))
    packed = torch.tensor([[word - 2**32 if word >= 2**31 else word] * 4], dtype=torch.int32)
    w = int_pack.dequantize(packed, torch.tensor([[0.5]]), shape=(1, 32))
    assert torch.equal(w, values.float() * 0.5)


def test_int_pack_round_trip_and_bad_input():
    w = torch.randn(6, 100)  # a ragged last group and word
    packed, scale, zp = int_pack.quantize(w)
    assert packed.shape == (6, 13) and scale.shape == (6, 4) and zp is None
    deq = int_pack.dequantize(packed, scale, shape=(6, 100))
    assert float((deq - w).abs().max() / w.abs().max()) <= 1 / 7.5 + 1e-6  # the top clamps 7.5 steps to 7
    with pytest.raises(ValueError, match=r"experts.3.w1: weight_scale shape \[6, 3\] does not fit"):
        int_pack.dequantize(packed, scale[:, :3], shape=(6, 100), name="experts.3.w1")
    with pytest.raises(ValueError, match="weight_shape"):
        int_pack.dequantize(packed, scale, shape=(6, 200))


@pytest.mark.parametrize(
    "bits, symmetric", [(4, True), (8, True), (4, False), (8, False), (2, True), (3, True), (3, False)]
)
def test_int_pack_equals_compressed_tensors(bits, symmetric):
    """The packing, the scales and zero points, and the dequantized weight of compressed-tensors' own compressor."""
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(12, 96) + (0 if symmetric else 0.7)  # asymmetric: groups not centred on zero
    packed, scale, zp = int_pack.quantize(w, bits=bits, symmetric=symmetric)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=32)
    groups = w.unflatten(-1, (-1, 32))
    their_scale, their_zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    assert torch.allclose(scale, their_scale, rtol=1e-6)
    q = quantize(w, their_scale, their_zp, args, dtype=torch.int8)
    assert torch.equal(packed, ct.pack_to_int32(q, bits))
    if not symmetric:
        assert torch.equal(zp, ct.pack_to_int32(their_zp.to(torch.int8), bits, packed_dim=0))
    theirs = dequantize(q, their_scale, their_zp, args)
    ours = int_pack.dequantize(packed, scale, (12, 96), bits=bits, zero_point=zp)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dense_packing_round_trips_at_every_width(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(bits)
    for width in range(1, 70):
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, width), generator=gen)
        packed = int_pack.pack(q, bits)
        assert packed.shape[-1] == int_pack.words(width, bits)
        assert torch.equal(packed, ct.pack_to_int32(q.to(torch.int8), bits))
        assert torch.equal(int_pack.unpack(packed, bits, width), q.to(torch.int32))
