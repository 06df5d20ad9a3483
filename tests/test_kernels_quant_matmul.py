"""quant_linear (Triton) against quant_linear_torch, and the int4/int8 kernel packing against the
canonical QuantizedWeight layout."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

from moecompress.kernels.testing import assert_close, ensure_interpreter  # noqa: E402

DEVICE = ensure_interpreter()

from moecompress.kernels.packing import (  # noqa: E402
    QuantWeights, from_quantized, pack_chunk, pack_int4, repack_for_kernel, unpack_int4,
)
from moecompress.kernels.quant_matmul import quant_linear, quant_linear_torch  # noqa: E402
from moecompress.quant.spec import QuantizedWeight, QuantSpec  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("poisoned")


def _canonical(gen, shape, bits, group_size, symmetric):
    *lead, n, k = shape
    g = k // (group_size or k)
    q = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    s = (0.5 + torch.rand(*lead, n, g, generator=gen)) / (2**bits * k**0.5)
    z = (torch.full((*lead, n, g), 1 << (bits - 1), dtype=torch.uint8) if symmetric
         else torch.randint(0, 2**bits, (*lead, n, g), generator=gen, dtype=torch.uint8))
    return QuantizedWeight(q, s, z, QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric))


def _to(qw: QuantWeights, device):
    return QuantWeights(qw.qweight.to(device), qw.scales.to(device), None if qw.zeros is None else qw.zeros.to(device),
                        qw.bits, qw.group_size, qw.k)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_linear_fp32(gen, t, bits, group_size, symmetric):
    n, k = 96, 128  # N ragged against BLOCK_N=64
    qw = from_quantized(_canonical(gen, (n, k), bits, group_size, symmetric), scale_dtype=torch.float32)
    assert qw.symmetric == symmetric
    x = torch.randn(t, k, generator=gen)
    out = torch.full((t, n), float("nan"), device=DEVICE)
    got = quant_linear(x.to(DEVICE), _to(qw, DEVICE), out=out)
    assert_close(got, quant_linear_torch(x, qw), TOL[torch.float32], f"quant_linear int{bits} g{group_size}")


@pytest.mark.parametrize("t", [1, 33])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 128, True), (8, 64, False)])
def test_quant_linear_bf16(gen, t, bits, group_size, symmetric):
    n, k = 80, 128
    qw = from_quantized(_canonical(gen, (n, k), bits, group_size, symmetric), scale_dtype=torch.bfloat16)
    x = torch.randn(t, k, generator=gen).to(torch.bfloat16)
    got = quant_linear(x.to(DEVICE), _to(qw, DEVICE))
    assert got.dtype == torch.bfloat16
    assert_close(got, quant_linear_torch(x, qw).float(), TOL[torch.bfloat16], "quant_linear bf16")


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_split_k(gen, split_k):
    n, k, t = 48, 128, 7
    qw = from_quantized(_canonical(gen, (n, k), 4, 32, False), scale_dtype=torch.float32)
    x = torch.randn(t, k, generator=gen)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k}
    got = quant_linear(x.to(DEVICE), _to(qw, DEVICE), config=cfg)
    assert_close(got, quant_linear_torch(x, qw), TOL[torch.float32], f"split_k={split_k}")


def test_per_channel(gen):
    qw = from_quantized(_canonical(gen, (40, 96), 4, None, False), scale_dtype=torch.float32)
    assert qw.pack_k == 32 and qw.group_size == 96
    x = torch.randn(7, 96, generator=gen)
    assert_close(quant_linear(x.to(DEVICE), _to(qw, DEVICE)), quant_linear_torch(x, qw), 1e-5, "per-channel")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_repack_dequantizes_like_canonical(gen, bits, group_size, symmetric):
    canon = _canonical(gen, (3, 24, 256), bits, group_size, symmetric)
    qw = from_quantized(canon, scale_dtype=torch.float32)
    assert qw.shape == (3, 24, 256)
    assert qw.qweight.shape[-1] == (128 if bits == 4 else 256)
    assert (qw.zeros is None) == symmetric
    assert torch.equal(qw.codes(), canon.qweight)
    assert torch.equal(qw.dequantize(), canon.dequantize())
    bf = from_quantized(canon)  # default bf16 scales
    assert bf.scales.dtype == torch.bfloat16
    assert_close(bf.dequantize(), canon.dequantize(), 2**-8, "bf16 scales")


def test_int4_layout_is_half_chunk_split():
    q = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    p = pack_int4(q, 32)
    assert p.shape == (1, 32)
    # byte j of chunk c: low nibble column 32c+j, high nibble column 32c+16+j
    assert p[0, 0].item() == (q[0, 0] | (q[0, 16] << 4)).item()
    assert p[0, 17].item() == (q[0, 33] | (q[0, 49] << 4)).item()
    assert torch.equal(unpack_int4(p, 32), q)


def test_pack_chunk_and_errors():
    assert pack_chunk(4096, 128) == 128
    assert pack_chunk(4096, 256) == 128
    assert pack_chunk(96, 32) == 32
    assert pack_chunk(7168, 7168) == 128
    with pytest.raises(ValueError):
        pack_chunk(48, 16)  # chunk of 16 is too small for the int4 half-dots
    q = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(ValueError):
        repack_for_kernel(q, torch.ones(4, 2), None, 3, 32)
    with pytest.raises(ValueError):
        repack_for_kernel(q, torch.ones(4, 3), None, 4, 32)
    with pytest.raises(ValueError):
        repack_for_kernel(q, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8), 4, 32, symmetric=True)
