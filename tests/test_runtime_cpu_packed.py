"""Packed execution on the CPU (runtime.cpu_packed) against the dequantized fp32 reference."""

from __future__ import annotations

import pytest
import torch

from moecompress.runtime.cpu_packed import HAS_INT4, HAS_INT8, CpuQuantLinear, cpu_kind


def _weights(n, k, bits, group, symmetric, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** bits - 1
    q = torch.randint(0, qmax + 1, (n, k), generator=gen, dtype=torch.uint8)
    g = k // group
    scales = torch.rand(n, g, generator=gen) * 0.05 + 0.005
    zeros = (torch.full((n, g), 2 ** (bits - 1), dtype=torch.uint8) if symmetric
             else torch.randint(0, qmax + 1, (n, g), generator=gen, dtype=torch.uint8))
    g_idx = None
    if act_order:  # GPTQ's act-order "group": a permutation of the columns, each group `group` of them
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    gi = g_idx.long() if g_idx is not None else torch.arange(k) // group
    w = scales[:, gi] * (q.float() - zeros[:, gi].float())
    return q, scales, zeros, g_idx, w


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("bits,group,symmetric,act_order", [
    (4, 32, True, False), (4, 64, False, False), (4, 128, True, True), (4, 256, False, True),
    (8, 256, True, False), (8, 64, True, False), (8, 32, True, True), (8, 8, True, False), (8, 128, False, False),
    (8, 256, False, True), (8, 64, False, True), (3, 64, False, False), (2, 32, True, True)])
def test_packed_linear_matches_the_dequantized_weight(tokens, bits, group, symmetric, act_order):
    n, k = 48, 256
    q, s, z, g_idx, w = _weights(n, k, bits, group, symmetric, act_order, seed=tokens)
    bias = torch.randn(n)
    lin = CpuQuantLinear(q, s, z, bits, group, g_idx, bias, symmetric=symmetric)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1))
    ref = x @ w.T + bias
    y = lin(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    kind = lin.kind
    if kind == "codes":  # dequantized per call in fp32: the fp32 path's numbers
        assert _rel(y, ref) < 1e-6, kind
    else:  # bf16 activations, scales and zeros; fp32 accumulation
        assert _rel(y, ref) < 1e-2, (kind, _rel(y, ref))
    assert _rel(lin.weight(), w) < (1e-6 if kind == "codes" else 1e-2)
    expect = cpu_kind(bits, n, k, group, symmetric)
    assert kind == expect  # act-order is a permutation here: it never forces the slow path
    if bits == 4 and HAS_INT4:
        assert kind == "int4pack"
    if bits == 8 and HAS_INT8:  # per group or with zero points: the per-channel kernel once per group of columns
        # (groups under 16 columns: the kernel's numbers are wrong there, so the exact codes path)
        assert kind == ("codes" if group % 16 else "int8pack" if group == k and symmetric else "int8group")


@pytest.mark.skipif(not HAS_INT4, reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("k,symmetric", [(1024, True), (768, False), (96, True)])
def test_per_channel_int4_runs_the_kernel_with_its_scale_repeated(k, symmetric):
    """Per-channel int4 (``--group-size -1``, GPTQ's "g-1" releases) takes the int4 kernel at the largest group of
    32/64/128/256 that divides K, one scale and zero per row repeated: the dequantized numbers to bf16 precision."""
    q, s, z, _, w = _weights(64, k, 4, k, symmetric, seed=k)
    lin = CpuQuantLinear(q, s, z, 4, k, symmetric=symmetric)
    assert lin.kind == "int4pack" and lin.group_size == {1024: 256, 768: 256, 96: 32}[k]
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    assert _rel(lin(x), x @ w.T) < 1e-2 and _rel(lin.weight(), w) < 1e-2
    exact = CpuQuantLinear(q, s, z, 4, k, symmetric=symmetric, exact=True)
    assert exact.kind == "codes" and _rel(exact(x), x @ w.T) < 1e-6


@pytest.mark.skipif(not HAS_INT8, reason="this torch has no CPU int8 kernel")
@pytest.mark.parametrize("rows,group,mean", [(1, 64, 3.0), (1, 64, 0.0), (1, 512, 0.0), (200, 64, 3.0), (200, 512, 0.0)])
def test_int8_zero_points_keep_their_precision_with_large_activations(rows, group, mean, monkeypatch):
    """Asymmetric int8 with zero points far from 128, activations with and without a mean: the zero points' part
    (formed after the kernel on one row, exactly in bf16 on the many-rows path) costs no more than bf16 rounding,
    for every row of a decode (one row per call) as for a prefill."""
    from moecompress.runtime import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "DEQUANT_MIN_WEIGHTS", 0)
    gen = torch.Generator().manual_seed(rows + group)
    n, k = 64, 512
    w = torch.randn(n, k, generator=gen)
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0) + 4.0  # skewed ranges: z far from 128
    scales = (hi - lo) / 255
    zeros = torch.round(-lo / scales).clamp(0, 255)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 255).reshape(n, k).to(torch.uint8)
    wq = (scales[..., None] * (q.reshape(n, k // group, group).float() - zeros[..., None])).reshape(n, k)
    lin = CpuQuantLinear(q, scales, zeros.to(torch.uint8), 8, group, symmetric=False)
    assert lin.kind == "int8group" and (zeros - 128).abs().max() > 60
    x = torch.randn(rows if rows > 1 else 32, k, generator=gen) + mean
    xb = x.to(torch.bfloat16).float()  # the kernels' own input rounding, for a tighter bound
    if rows > 1:
        assert _rel(lin(x), x @ wq.T) < 6e-3, _rel(lin(x), x @ wq.T)
        assert _rel(lin(x), xb @ wq.T) < 4e-3
    else:  # decode: each row alone through the kernel path
        worst = max(_rel(lin(x[r:r + 1]), xb[r:r + 1] @ wq.T) for r in range(x.shape[0]))
        assert worst < 5e-3, worst


def test_packed_is_smaller_than_fp32_and_odd_shapes_fall_back():
    q, s, z, _, w = _weights(64, 512, 4, 128, True)
    lin = CpuQuantLinear(q, s, z, 4, 128, symmetric=True)
    nbytes = sum(b.numel() * b.element_size() for b in lin.buffers())
    assert nbytes < 0.15 * w.numel() * 4  # ~4.5 bits per weight against 32
    q, s, z, _, w = _weights(40, 96, 4, 32, False)  # N not a multiple of 16: the int4 kernel refuses it
    lin = CpuQuantLinear(q, s, z, 4, 32)
    assert lin.kind == "codes"
    x = torch.randn(5, 96)
    assert _rel(lin(x), x @ w.T) < 1e-6


def test_a_torch_without_the_int4_kernel_falls_back_with_one_warning(tiny_ckpt, tmp_path, monkeypatch, caplog):
    """No CPU int4 op in this torch: the runtime still loads (codes, dequantized per call), says so in one
    line per reason naming the modules, and computes the exact path's numbers."""
    import logging

    from conftest import quick_config

    from moecompress.pipeline import quantize
    from moecompress.runtime import Runtime, cpu_packed

    q = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), q, quick_config(method="rtn", bits=4, group_size=32))
    monkeypatch.setattr(cpu_packed, "HAS_INT4", False)
    with caplog.at_level(logging.WARNING, logger="moecompress.runtime"):
        rt = Runtime.load(q)
    lines = [r.getMessage() for r in caplog.records if "dequantized per call" in r.getMessage()]
    assert len(lines) == 1 and "no CPU int4 kernel" in lines[0] and "q_proj" in lines[0]
    assert set(rt.report.cpu_kinds) == {"codes"}
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    exact = Runtime.load(q, cpu_weights="exact")
    assert torch.equal(rt.logits(ids), exact.logits(ids))


@pytest.mark.parametrize("family,cpu_weights", [("qwen3_moe", "packed"), ("deepseek_v3", "exact"),
                                               ("qwen2_moe", "dequantized")])
def test_split_experts_give_the_unsplit_outputs(tiny_ckpt, tmp_path, family, cpu_weights):
    """Expert offload with the GPU side simulated on the CPU: half of each layer's experts "near", the rest
    "far"; greedy tokens equal the unsplit runtime's and logits agree to float rounding (the two sides'
    outputs are added instead of accumulated together)."""
    from conftest import quick_config

    from moecompress.pipeline import quantize
    from moecompress.runtime import Runtime
    from moecompress.runtime.offload import SplitExperts

    q = tmp_path / "q"
    quantize(tiny_ckpt(family), q, quick_config(method="rtn", bits=4, group_size=32))
    whole = Runtime.load(q, cpu_weights=cpu_weights)
    moe = [i for i, layer in enumerate(whole.model.layers) if type(layer.mlp).__name__ == "MoEBlock"]
    near = {i: [e for e in range(8) if (e + i) % 2 == 0] for i in moe}
    split = Runtime.load(q, cpu_weights=cpu_weights, offload=near)
    assert split.report.offloaded_experts == 4 * len(moe) and not split.cuda_graph
    assert all(isinstance(split.model.layers[i].mlp.experts, SplitExperts) for i in moe)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    a = whole.generate(prompt, 12, stop_ids=[], keep_logits=True)
    b = split.generate(prompt, 12, stop_ids=[], keep_logits=True)
    assert a.tokens == b.tokens
    assert max(float((x - y).norm() / x.norm()) for x, y in zip(a.logits, b.logits)) < 1e-5
    with pytest.raises(Exception, match="outside"):
        Runtime.load(q, cpu_weights=cpu_weights, offload={moe[0]: [99]})


def test_split_on_the_kernel_path_under_the_interpreter(tiny_ckpt, tmp_path):
    """The real offload code path (near experts packed for the Triton fused MoE, far experts packed on the
    CPU), run by Triton's interpreter: the unsplit kernel path's tokens, logits to bf16-kernel tolerance."""
    from conftest import quick_config

    from moecompress.kernels import _common
    from moecompress.pipeline import quantize
    from moecompress.runtime import Runtime
    from moecompress.runtime.cpu_packed import CpuExperts
    from moecompress.runtime.offload import SplitExperts

    if not _common.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    q = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), q, quick_config(method="rtn", bits=4, group_size=32))
    whole = Runtime.load(q, kernels=True)
    split = Runtime.load(q, kernels=True, offload={0: [1, 2, 5], 1: [0, 7]})
    e0 = split.model.layers[0].mlp.experts
    assert isinstance(e0, SplitExperts) and e0.near.use_kernels and isinstance(e0.far, CpuExperts)
    assert split.report.offloaded_experts == 5 + 6
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    a = whole.generate(prompt, 4, stop_ids=[], keep_logits=True)
    b = split.generate(prompt, 4, stop_ids=[], keep_logits=True)
    assert a.tokens == b.tokens
    assert max(float((x - y).norm() / x.norm()) for x, y in zip(a.logits, b.logits)) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_offload_on_a_gpu_gives_the_unsplit_tokens(tiny_ckpt, tmp_path, family):
    """The real split (issue 12): near experts on the GPU through the Triton fused MoE, far ones in host memory
    on the CPU (``exact``: fp32 math on the packed codes), against the unsplit GPU runtime in fp32: the same
    greedy tokens, logits to kernel rounding; the far experts' weights never reach the GPU."""
    from conftest import quick_config

    from moecompress.pipeline import quantize
    from moecompress.runtime import Runtime
    from moecompress.runtime.offload import SplitExperts

    q = tmp_path / "q"
    quantize(tiny_ckpt(family), q, quick_config(method="rtn", bits=4, group_size=32))
    whole = Runtime.load(q, device="cuda", dtype="float32")
    moe = [i for i, layer in enumerate(whole.model.layers) if type(layer.mlp).__name__ == "MoEBlock"]
    near = {i: [e for e in range(8) if (e + i) % 3 == 0] for i in moe}
    split = Runtime.load(q, device="cuda", dtype="float32", cpu_weights="exact", offload=near)
    assert split.report.offloaded_experts == sum(8 - len(v) for v in near.values()) and not split.cuda_graph
    for i in moe:
        e = split.model.layers[i].mlp.experts
        assert isinstance(e, SplitExperts)
        near_t, far_t = list(e.near.buffers()), list(e.far.buffers())  # packed codes and scales are buffers
        assert near_t and all(t.device.type == "cuda" for t in near_t)
        assert far_t and all(t.device.type == "cpu" for t in far_t)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    a = whole.generate(prompt, 24, stop_ids=[], keep_logits=True)
    b = split.generate(prompt, 24, stop_ids=[], keep_logits=True)
    assert a.tokens == b.tokens
    # 2.6e-7 under Triton's interpreter (fp32 throughout); on a GPU the fused MoE's fp32 dots may run in TF32
    assert max(float((x.cpu() - y.cpu()).norm() / x.cpu().norm()) for x, y in zip(a.logits, b.logits)) < 5e-3


@pytest.mark.skipif(not HAS_INT4 or not HAS_INT8, reason="this torch has no CPU int4/int8 kernels")
@pytest.mark.parametrize("bits,group", [(4, 64), (8, None), (8, 32)])
def test_one_token_kernel_path_matches_the_dequantized_experts(bits, group):
    """CpuExperts.forward_one on the kernels (x cast once, the SiLU gate in bf16) against fp32 experts on
    the dequantized weights: bf16 precision; ids >= E (zero experts) touch nothing. ``group`` None: per-channel."""
    from moecompress.runtime.cpu_packed import CpuExperts
    from moecompress.runtime.moe import _experts_one

    e, h, i = 6, 128, 64
    gu = [_weights(2 * i, h, bits, group or h, True, seed=j) for j in range(e)]
    dn = [_weights(h, i, bits, group or i, True, seed=100 + j) for j in range(e)]
    lin = lambda t, g: CpuQuantLinear(t[0], t[1], t[2], bits, g, symmetric=True)  # noqa: E731
    experts = CpuExperts([lin(t, group or h) for t in gu], [lin(t, group or i) for t in dn])
    assert all(m.kind != "codes" for m in (*experts.gate_up, *experts.down))
    w13, w2 = torch.stack([t[4] for t in gu]), torch.stack([t[4] for t in dn])
    gen = torch.Generator().manual_seed(0)
    for ids, ws in (([0, 3, 5], [0.5, 0.3, 0.2]), ([2, e, 4, e + 1], [0.4, 0.3, 0.2, 0.1])):
        x = torch.randn(1, h, generator=gen)
        ours = experts.forward_one(x, ids, ws)
        assert experts.__dict__["_lists"][2]  # the kernel path ran
        ref = _experts_one(x, w13.transpose(1, 2), w2.transpose(1, 2), ids, ws)
        assert _rel(ours, ref) < 2e-2, _rel(ours, ref)
        general = experts(torch.cat([x, x]), torch.tensor([ws, ws]), torch.tensor([ids, ids]))[:1]
        assert _rel(ours, general) < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_groups_of_unequal_size_fall_back_and_say_so(bits):
    """A g_idx whose groups differ in size (the dequantizer takes it; no kernel layout does): the exact ``codes``
    way, with the reason recorded (it is what the runtime's fallback report and warning print)."""
    n, k, g = 64, 128, 32
    q, s, z, _, _ = _weights(n, k, bits, g, False)
    g_idx = (torch.arange(k) * 7 % k // g).int()
    g_idx[:3] = 3
    lin = CpuQuantLinear(q, s, z, bits, g, g_idx, symmetric=False)
    w = s[:, g_idx.long()] * (q.float() - z[:, g_idx.long()].float())
    x = torch.randn(3, k)
    assert lin.kind == "codes" and "unequal" in lin.why and _rel(lin(x), x @ w.T) < 1e-6
