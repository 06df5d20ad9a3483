"""GPTQ v1 encoding, checked against values derived by hand from the documented layout."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moecompress.errors import UserError
from moecompress.quant.formats import gptq
from moecompress.quant.spec import QuantizedWeight, QuantSpec


def to_int32(word: int) -> int:
    """An unsigned 32-bit word as the int32 value stored on disk."""
    assert 0 <= word < 1 << 32
    return word - (1 << 32) if word >= 1 << 31 else word


def make_qw(n, k, spec, seed=0, g_idx=None):
    gen = torch.Generator().manual_seed(seed)
    g = 1 if spec.group_size is None else k // spec.group_size
    q = torch.randint(0, spec.qmax + 1, (n, k), generator=gen).to(torch.uint8)
    scales = (torch.rand(n, g, generator=gen) * 0.05 + 1e-3).half().float()  # fp16-exact
    if spec.symmetric:
        zeros = torch.full((n, g), spec.sym_zero, dtype=torch.uint8)
    else:
        zeros = torch.randint(1, spec.qmax + 1, (n, g), generator=gen).to(torch.uint8)
    return QuantizedWeight(q, scales, zeros, spec, g_idx)


def dequant_from_packed(t: dict, bits: int) -> torch.Tensor:
    """Independent reader: W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzero[g_idx[k], n] + 1)), W as [N, K]."""
    qweight, qzeros = t["qweight"].numpy().astype(np.int64) & 0xFFFFFFFF, t["qzeros"].numpy().astype(np.int64) & 0xFFFFFFFF
    scales, g_idx = t["scales"].float().numpy(), t["g_idx"].numpy()
    per = 32 // bits
    k_dim, n_dim = qweight.shape[0] * per, scales.shape[1]
    w = np.zeros((n_dim, k_dim), dtype=np.float32)
    mask = (1 << bits) - 1
    for k in range(k_dim):
        for n in range(n_dim):
            q = (qweight[k // per, n] >> (bits * (k % per))) & mask
            qz = (qzeros[g_idx[k], n // per] >> (bits * (n % per))) & mask
            w[n, k] = scales[g_idx[k], n] * np.float32(q - (qz + 1))
    return torch.from_numpy(w)


def test_4bit_words_by_hand():
    n, k, g = 8, 16, 8
    spec = QuantSpec(bits=4, group_size=g, symmetric=False)
    q = torch.tensor([[(3 * i + j) % 16 for j in range(k)] for i in range(n)], dtype=torch.uint8)
    zeros = torch.tensor([[1 + (i + 5 * gi) % 15 for gi in range(2)] for i in range(n)], dtype=torch.uint8)
    scales = torch.tensor([[0.5 + 0.25 * i + gi for gi in range(2)] for i in range(n)])
    t = gptq.encode_linear(QuantizedWeight(q, scales, zeros, spec))
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (2, 8)  # [K*b/32, N]
    for r in range(2):
        for col in range(n):
            word = sum(int(q[col, 8 * r + j]) << (4 * j) for j in range(8))
            assert t["qweight"][r, col].item() == to_int32(word)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (2, 1)  # [G, N*b/32]
    for gi in range(2):
        word = sum((int(zeros[col, gi]) - 1) << (4 * col) for col in range(n))  # stored minus one
        assert t["qzeros"][gi, 0].item() == to_int32(word)
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"], scales.t().half())
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [i // g for i in range(k)]
    assert torch.equal(dequant_from_packed(t, 4), QuantizedWeight(q, scales, zeros, spec).dequantize())


def test_symmetric_4bit_stores_seven():
    spec = QuantSpec(bits=4, group_size=8, symmetric=True)
    t = gptq.encode_linear(make_qw(8, 16, spec))
    assert t["qzeros"].tolist() == [[0x77777777], [0x77777777]]


def test_8bit_by_hand_and_high_bit():
    spec = QuantSpec(bits=8, group_size=None, symmetric=False)
    qw = make_qw(8, 8, spec, seed=3)
    qw.qweight[0, 3] = 255  # bit 31 of word 0 set -> negative int32
    t = gptq.encode_linear(qw)
    assert t["qweight"].shape == (2, 8) and t["qzeros"].shape == (1, 2)
    for r in range(2):
        for col in range(8):
            word = sum(int(qw.qweight[col, 4 * r + j]) << (8 * j) for j in range(4))
            assert t["qweight"][r, col].item() == to_int32(word)
    assert t["qweight"][0, 0].item() < 0
    for c in range(2):
        word = sum((int(qw.zeros[4 * c + j, 0]) - 1) << (8 * j) for j in range(4))
        assert t["qzeros"][0, c].item() == to_int32(word)
    assert t["g_idx"].tolist() == [0] * 8
    assert torch.equal(dequant_from_packed(t, 8), qw.dequantize())


def autogptq_pack_3bit(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ v1 QuantLinear.pack's 3-bit loop over rows of ``intweight`` [K, N] (K % 32 == 0)."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * 3, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qweight.astype(np.int32)


def test_3bit_matches_autogptq_layout():
    spec = QuantSpec(bits=3, group_size=32, symmetric=False)
    qw = make_qw(64, 64, spec, seed=7)
    t = gptq.encode_linear(qw)
    assert t["qweight"].shape == (6, 64) and t["qzeros"].shape == (2, 6)
    expected_w = autogptq_pack_3bit(qw.qweight.t().numpy())
    assert np.array_equal(t["qweight"].numpy(), expected_w)
    # qzeros: the same 3-bit layout along N, applied to zero - 1 (rows of the transposed matrix)
    expected_z = autogptq_pack_3bit((qw.zeros.numpy().astype(np.int64) - 1)).T
    assert np.array_equal(t["qzeros"].numpy(), expected_z)
    back = gptq.decode_linear(t, spec)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zeros, qw.zeros)


def test_act_order_g_idx():
    k, g = 64, 16
    spec = QuantSpec(bits=4, group_size=g, symmetric=True, act_order="group")
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // g).to(torch.int32)  # i-th processed column falls in group i // g
    qw = make_qw(32, k, spec, seed=2, g_idx=g_idx)
    t = gptq.encode_linear(qw)
    assert torch.equal(t["g_idx"], g_idx)
    assert torch.equal(dequant_from_packed(t, 4), qw.dequantize())
    back = gptq.decode_linear(t, spec)
    assert torch.equal(back.g_idx, g_idx) and torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [32, None])
def test_round_trip(bits, sym, gs):
    spec = QuantSpec(bits=bits, group_size=gs, symmetric=sym)
    qw = make_qw(64, 128, spec, seed=bits)
    bias = torch.randn(64)
    t = gptq.encode_linear(qw, bias=bias)
    assert t["bias"].dtype == torch.float16
    assert t["qweight"].shape == (128 * bits // 32, 64)
    assert t["qzeros"].shape == (qw.scales.shape[1], 64 * bits // 32)
    back = gptq.decode_linear(t, spec)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales) and back.g_idx is None
    if bits in (2, 4, 8):
        assert torch.equal(dequant_from_packed(t, bits), qw.dequantize())


def test_zero_point_zero_is_lifted_exactly_or_rejected():
    spec = QuantSpec(bits=4, group_size=16, symmetric=False)
    qw = make_qw(8, 32, spec, seed=4)
    qw.zeros[2, 1] = 0
    qw.qweight[2, 16:32] = qw.qweight[2, 16:32].clamp(max=14)
    t = gptq.encode_linear(qw)
    assert torch.equal(dequant_from_packed(t, 4), qw.dequantize())
    back = gptq.decode_linear(t, spec)
    assert back.zeros[2, 1].item() == 1 and torch.equal(back.dequantize(), qw.dequantize())
    qw.qweight[2, 20] = 15
    with pytest.raises(UserError, match="zero point 0"):
        gptq.encode_linear(qw)


def test_rejects_dims_that_do_not_fill_words():
    with pytest.raises(UserError, match="multiples of 32"):
        gptq.encode_linear(make_qw(32, 16, QuantSpec(bits=3, group_size=16)))


def test_quantize_config():
    rules = [r".*mlp\.gate$", gptq.exact_name_regex("model.layers.0.mlp.shared_expert_gate")]
    cfg = gptq.quantize_config(QuantSpec(bits=4, group_size=128, act_order="group"), rules, damp_percent=0.05)
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert (cfg["bits"], cfg["group_size"], cfg["desc_act"], cfg["sym"]) == (4, 128, True, True)
    assert cfg["damp_percent"] == 0.05 and cfg["true_sequential"] is True
    assert cfg["dynamic"] == {r"-:.*mlp\.gate$": {}, r"-:model\.layers\.0\.mlp\.shared_expert_gate$": {}}
    ch = gptq.quantize_config(QuantSpec(bits=8, group_size=None, symmetric=False, act_order="weight"))
    assert (ch["group_size"], ch["desc_act"], ch["sym"], ch["dynamic"]) == (-1, False, False, {})

    def skipped(name):  # GPTQModel dynamic_get / vLLM get_dynamic_override: re.match on the full name
        return any(p.startswith("-:") and re.match(p[2:], name) for p in cfg["dynamic"])

    assert skipped("model.layers.3.mlp.gate") and skipped("model.layers.0.mlp.shared_expert_gate")
    assert not skipped("model.layers.3.mlp.gate_proj") and not skipped("model.layers.1.mlp.shared_expert_gate")
    from transformers.utils.quantization_config import GPTQConfig

    hf = GPTQConfig.from_dict(dict(cfg))
    assert (hf.bits, hf.group_size, hf.desc_act, hf.format) == (4, 128, True, "gptq")


def test_gptq_format_asym_quantization_never_needs_zero_point_zero():
    """The config's spec keeps asymmetric zero points >= 1 for GPTQ v1, so all-positive groups export."""
    from moecompress.quant.gptq import gptq_quantize
    from moecompress.quant.rtn import rtn_quantize
    from moecompress.settings import build_config

    spec = build_config(format="gptq", symmetric=False, bits=4, group_size=32).spec()
    assert spec.zero_min == 1
    assert build_config(symmetric=False).spec().zero_min == 0  # compressed-tensors stores zero points as is
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[:, :32] = w[:, :32].abs() + 0.1  # every row's first group is all positive: min/max gives zero point 0
    x = torch.randn(256, 64, generator=g)
    for qw in (rtn_quantize(w, spec), gptq_quantize(w, 2 * x.T @ x / 256, spec)[0]):
        assert int(qw.zeros.min()) >= 1
        back = gptq.decode_linear(gptq.encode_linear(qw), spec)  # would raise on a zero point 0 using code 15
        assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zeros, qw.zeros)


def test_reader_refuses_gptq_layouts_other_than_v1():
    """GPTQ v1 stores zero points minus one; a gptq_v2 checkpoint (zero points as they are) read as v1 would
    decode every weight one zero step off, silently: it is refused, as are marlin/bitblas repacks."""
    from moecompress.checkpoint.dequant import spec_from_config

    v1 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    assert spec_from_config(dict(v1, checkpoint_format="gptq"))[1].bits == 4
    assert spec_from_config(v1)[1].bits == 4  # AutoGPTQ's configs before checkpoint_format existed
    for fmt in ("gptq_v2", "marlin", "bitblas"):
        with pytest.raises(UserError, match=f"format '{fmt}'"):
            spec_from_config(dict(v1, checkpoint_format=fmt))
    with pytest.raises(UserError, match="format 'gptq_v2'"):
        spec_from_config(dict(v1, format="gptq_v2"))


@pytest.mark.parametrize("fmt,bits,gs,what", [
    ("gptq", 3, "-1", "mlp.experts.gate_up_proj: GPTQ v1 needs K*bits and N*bits to be multiples of 32"),
    ("awq", 4, "16", "mlp.experts.gate_up_proj: the AWQ format packs output channels by 8"),
])
def test_shapes_the_format_cannot_pack_are_refused_before_any_work(capsys, tiny_ckpt, tmp_path, fmt, bits, gs, what):
    """Experts 44 wide: 3-bit GPTQ v1 cannot pack 44 x 3 bits in whole words, AWQ cannot pack 44 outputs by 8.
    The error names the linear and comes before calibration (nothing to wait for), with advice that applies
    to routed experts (always quantized): another format."""
    from conftest import run_cli

    src = tiny_ckpt("qwen3_moe", moe_intermediate_size=44)
    rc, err = run_cli(capsys, "quantize", src, "--out", tmp_path / "q", "--format", fmt, "--bits", bits,
                      "--group-size", gs, "--method", "rtn", "--calib-samples", 4, "--seq-len", 32)
    assert rc == 2 and len(err) == 1, err
    assert what in err[0] and "routed experts are always quantized: use --format compressed-tensors" in err[0]
    assert not (tmp_path / "q").exists() and not any(tmp_path.glob(".q*"))


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_errors_are_reported_for_the_weights_as_written(tiny_ckpt, tmp_path, fmt):
    """GPTQ v1 stores scales in fp16 (AWQ too for an fp32 model): the solvers round them to the format's dtype,
    so the weights calibration feeds on and the errors moecompress.json reports are those on disk."""
    import json

    from conftest import quick_config
    from moecompress.checkpoint.dequant import dequantized_state
    from moecompress.pipeline import quantize
    from moecompress.quant.targets import weight_rel_error

    src = tiny_ckpt("qwen3_moe")  # float32
    out = tmp_path / "q"
    quantize(src, out, quick_config(method="rtn", format=fmt, symmetric=fmt != "gptq"))
    disk = dict(dequantized_state(out))
    orig = dict(dequantized_state(src))
    rec = json.loads((out / "moecompress.json").read_text())["layers"][0]["linears"]
    for local in ("self_attn.o_proj", "self_attn.q_proj"):
        name = f"model.layers.0.{local}.weight"
        want = float(weight_rel_error(orig[name], disk[name]))
        assert rec[local]["weight_rel_err"] == pytest.approx(want, rel=1e-6), local


@pytest.mark.parametrize("fmt,warned", [("compressed-tensors", True), ("gptq", True), ("awq", False)])
def test_asymmetric_output_that_serving_engines_refuse_is_said(tiny_ckpt, tmp_path, caplog, fmt, warned):
    import logging

    from conftest import quick_config
    from moecompress.pipeline import quantize

    with caplog.at_level(logging.WARNING, logger="moecompress"):
        quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q", quick_config(method="rtn", format=fmt, symmetric=False))
    said = [r.getMessage() for r in caplog.records if "asymmetric" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "--format awq" in said[0]


@pytest.mark.parametrize("act_order,warned", [("group", True), ("weight", False)])
def test_group_act_order_that_vllm_refuses_is_said(tiny_ckpt, tmp_path, caplog, act_order, warned):
    """vLLM refuses desc_act: true (benchmarks/vllm_interop.py); the static order it takes is the default."""
    import logging

    from conftest import quick_config
    from moecompress.pipeline import quantize

    with caplog.at_level(logging.WARNING, logger="moecompress"):
        quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q", quick_config(method="gptq", format="gptq", act_order=act_order))
    said = [r.getMessage() for r in caplog.records if "desc_act" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "vLLM refuses" in said[0] and "--act-order weight" in said[0] and "\n" not in said[0]
