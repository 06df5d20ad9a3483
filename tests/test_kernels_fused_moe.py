"""fused_moe (Triton) against fused_moe_torch: dense and int4/int8 group-quantized experts, zero experts."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

from moecompress.kernels.testing import assert_close, ensure_interpreter  # noqa: E402

DEVICE = ensure_interpreter()

from moecompress.kernels.fused_moe import MoEQuantWeights, fused_moe, fused_moe_torch, repack_for_kernel  # noqa: E402

E, Z = 8, 2  # real experts, zero experts (ids in [E, E+Z) contribute nothing)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("poisoned")


def _routing(gen, t, k, e=E, z=Z):
    ids = torch.stack([torch.randperm(e + z, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    ids = ids.to(torch.int32)
    if t:
        ids[ids == 3] = 4  # expert 3 receives no tokens
    w = torch.rand(t, k, generator=gen)
    return w.to(DEVICE), ids.to(DEVICE)


def _dense(gen, h, i, dtype):
    w13 = torch.randn(E, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(E, h, i, generator=gen) / i**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def _quant(gen, n, k, bits, group_size, symmetric, scale_dtype):
    q = torch.randint(0, 2**bits, (E, n, k), generator=gen, dtype=torch.uint8)
    g = k // group_size
    # scales ~ 1/(2^bits sqrt(k)) keep activations O(1) through both GEMMs
    s = (0.5 + torch.rand(E, n, g, generator=gen)) * (4.0 / 2**bits / k**0.5)
    z = None if symmetric else torch.randint(0, 2**bits, (E, n, g), generator=gen, dtype=torch.uint8)
    return repack_for_kernel(q.to(DEVICE), s.to(DEVICE), None if z is None else z.to(DEVICE), bits, group_size,
                             scale_dtype=scale_dtype)


def _run(x, w13, w2, w, ids, tol, config=None):
    t, h = x.shape
    out = torch.full((t, h), float("nan"), dtype=x.dtype, device=DEVICE)
    got = fused_moe(x, w13, w2, w, ids, num_experts=E, config=config, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = fused_moe_torch(x.cpu(), *(_cpu(a) for a in (w13, w2, w, ids)), num_experts=E)
    assert_close(got, ref.float(), tol, f"fused_moe {tuple(x.shape)} w13={tuple(w13.shape)}")
    return got


def _cpu(a):
    if isinstance(a, MoEQuantWeights):
        return MoEQuantWeights(a.qweight.cpu(), a.scales.cpu(), None if a.zeros is None else a.zeros.cpu(),
                               a.bits, a.group_size, a.k)
    return a.cpu()


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense(gen, t, dtype):
    h, i = 72, 40  # ragged against BLOCK_N/BLOCK_K = 64 in both GEMMs
    x = torch.randn(t, h, generator=gen).to(DEVICE, dtype)
    w, ids = _routing(gen, t, 3)
    _run(x, *_dense(gen, h, i, dtype), w, ids, TOL[dtype])


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_fp32(gen, t, bits, group_size, symmetric):
    # H/I must be multiples of the group; 96 leaves a ragged N tile at BLOCK_N=64
    h, i = {32: (96, 96), 64: (128, 64), 128: (128, 128)}[group_size]
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    w13 = _quant(gen, 2 * i, h, bits, group_size, symmetric, torch.float32)
    w2 = _quant(gen, h, i, bits, group_size, symmetric, torch.float32)
    w, ids = _routing(gen, t, 2)
    _run(x, w13, w2, w, ids, TOL[torch.float32])


@pytest.mark.parametrize("t", [7, 33])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 128, True), (8, 64, True), (8, 32, False)])
def test_quantized_bf16(gen, t, bits, group_size, symmetric):
    h, i = 128, max(64, group_size)
    x = torch.randn(t, h, generator=gen).to(DEVICE, torch.bfloat16)
    w13 = _quant(gen, 2 * i, h, bits, group_size, symmetric, torch.bfloat16)
    w2 = _quant(gen, h, i, bits, group_size, symmetric, torch.bfloat16)
    w, ids = _routing(gen, t, 3)
    _run(x, w13, w2, w, ids, TOL[torch.bfloat16])


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2},
        {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1},  # 4 chunks of 32 per K step
        {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8},  # BLOCK_K below the chunk: raised to it
    ],
)
def test_tile_configs(gen, config):
    t, h, i = 33, 96, 96
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    w13 = _quant(gen, 2 * i, h, 4, 32, False, torch.float32)
    w2 = _quant(gen, h, i, 4, 32, False, torch.float32)
    w, ids = _routing(gen, t, 2)
    _run(x, w13, w2, w, ids, TOL[torch.float32], config=config)
    xd = torch.randn(t, 72, generator=gen).to(DEVICE)
    _run(xd, *_dense(gen, 72, 40, torch.float32), w, ids, TOL[torch.float32], config=config)


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("t", [1, 7])
def test_split_k(gen, split, t):
    """SPLIT_K sums K ranges in an fp32 buffer, then adds them in order and applies the epilogue: same
    result as one pass (to fp32 rounding), quantized and dense, with slots on zero experts; more splits
    than K steps fall back to one per step."""
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split}
    h, i = 128, 96
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    w13 = _quant(gen, 2 * i, h, 4, 32, False, torch.float32)
    w2 = _quant(gen, h, i, 4, 32, False, torch.float32)
    w, ids = _routing(gen, t, 3)
    got = _run(x, w13, w2, w, ids, TOL[torch.float32], config=cfg)
    one = fused_moe(x, w13, w2, w, ids, num_experts=E, config=dict(cfg, SPLIT_K=1))
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-6)
    xd = torch.randn(t, 72, generator=gen).to(DEVICE)
    _run(xd, *_dense(gen, 72, 40, torch.float32), w, ids, TOL[torch.float32], config=cfg)
    xb = x.to(torch.bfloat16)
    _run(xb, *_dense(gen, h, i, torch.bfloat16), w, ids, TOL[torch.bfloat16], config=cfg)


def test_per_channel_and_mixed(gen):
    # int8 per-channel gate/up (one group spanning K=96, packed in chunks of 32) with a dense down proj
    t, h, i = 7, 96, 64
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    q = torch.randint(0, 256, (E, 2 * i, h), generator=gen, dtype=torch.uint8)
    s = torch.rand(E, 2 * i, 1, generator=gen) * 0.02
    w13 = repack_for_kernel(q.to(DEVICE), s.to(DEVICE), None, 8, None, scale_dtype=torch.float32)
    assert w13.pack_k == 32 and w13.group_size == 96
    _, w2 = _dense(gen, h, i, torch.float32)
    w, ids = _routing(gen, t, 2)
    _run(x, w13, w2, w, ids, TOL[torch.float32])


@pytest.mark.parametrize("quantized", [False, True])
def test_all_slots_on_zero_experts(gen, quantized):
    t, h, i = 7, 128, 64
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    ids = torch.randint(E, E + Z, (t, 2), generator=gen, dtype=torch.int32).to(DEVICE)
    ids[0, 0] = -1  # also dropped
    w = torch.rand(t, 2, generator=gen).to(DEVICE)
    if quantized:
        w13, w2 = _quant(gen, 2 * i, h, 4, 64, True, torch.float32), _quant(gen, h, i, 4, 64, True, torch.float32)
    else:
        w13, w2 = _dense(gen, h, i, torch.float32)
    got = _run(x, w13, w2, w, ids, 0.0)
    assert (got == 0).all()


def test_zero_expert_slots_match_dropping_them(gen):
    # A token routed to (expert a, zero expert) gets exactly w_a * expert_a(x), as if top-1.
    t, h, i = 33, 72, 40
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    w13, w2 = _dense(gen, h, i, torch.float32)
    w, ids = _routing(gen, t, 2)
    ids = ids.long()  # int64 ids (HF routers return int64) take the same path
    ids[:, 1] = E + 1
    full = fused_moe(x, w13, w2, w, ids, num_experts=E)
    top1 = fused_moe(x, w13, w2, w[:, :1].contiguous(), ids[:, :1].contiguous(), num_experts=E)
    assert_close(full, top1, 1e-6, "zero-expert slot vs top-1")


@pytest.mark.parametrize("t", [1, 33])
def test_identity_zero_experts_longcat(gen, t):
    # LongCat-Flash: ids in [E, E+Z) are identity experts, out += w * x, still without any GEMM work
    h, i = 72, 40
    x = torch.randn(t, h, generator=gen).to(DEVICE)
    w13, w2 = _dense(gen, h, i, torch.float32)
    w, ids = _routing(gen, t, 3)
    out = torch.full((t, h), float("nan"), device=DEVICE)
    got = fused_moe(x, w13, w2, w, ids, num_experts=E, zero_expert_mode="identity", out=out)
    ref = fused_moe_torch(x.cpu(), w13.cpu(), w2.cpu(), w.cpu(), ids.cpu(), num_experts=E, zero_expert_mode="identity")
    assert_close(got, ref, 1e-5, "identity zero experts")
    plain = fused_moe_torch(x.cpu(), w13.cpu(), w2.cpu(), w.cpu(), ids.cpu(), num_experts=E)
    extra = ((ids.cpu() >= E).float() * w.cpu()).sum(1, keepdim=True) * x.cpu()
    assert_close(ref, plain + extra, 1e-6, "twin identity semantics")


def test_quant_tuple_and_empty(gen):
    h, i = 128, 64
    w13 = _quant(gen, 2 * i, h, 8, 64, False, torch.float32)
    w2 = _quant(gen, h, i, 8, 64, False, torch.float32)
    x = torch.randn(0, h, device=DEVICE)
    ids = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    assert fused_moe(x, None, None, ids.float(), ids, quant=(w13, w2)).shape == (0, h)
    x = torch.randn(7, h, generator=gen).to(DEVICE)
    w, ids = _routing(gen, 7, 2)
    a = fused_moe(x, None, None, w, ids, num_experts=E, quant=(w13, w2))
    b = fused_moe(x, w13, w2, w, ids, num_experts=E)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w13, w, ids)
