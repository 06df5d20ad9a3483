"""Packing and the compressed-tensors pack-quantized encoding, checked against compressed-tensors' own code."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig

from moecompress.errors import UserError
from moecompress.quant.formats import compressed_tensors as ct
from moecompress.quant.pack import awq_deinterleave, awq_interleave, pack_along, packed_length, unpack_along
from moecompress.quant.spec import QuantizedWeight, QuantSpec


def make_qw(n: int, k: int, spec: QuantSpec, seed: int = 0, scale_dtype=torch.float32) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    g = 1 if spec.group_size is None else k // spec.group_size
    q = torch.randint(0, spec.qmax + 1, (n, k), generator=gen).to(torch.uint8)
    q[0, 0], q[-1, -1] = 0, spec.qmax  # extremes always present
    scales = (torch.rand(n, g, generator=gen) * 0.1 + 1e-3).to(scale_dtype).float()
    if spec.symmetric:
        zeros = torch.full((n, g), spec.sym_zero, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, spec.qmax + 1, (n, g), generator=gen).to(torch.uint8)
    return QuantizedWeight(q, scales, zeros, spec)


def signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    return (q.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


# ---------------------------------------------------------------- packing vs pack_to_int32


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(5, 37), (3, 64), (1, 1), (7, 96), (33, 3)])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_ct_pack_to_int32(bits, shape, dim):
    q = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    ours = pack_along(q, bits, dim)
    theirs = pack_to_int32(signed(q, bits), bits, packed_dim=dim)
    assert ours.dtype == torch.int32
    assert ours.shape[dim] == packed_length(shape[dim], bits)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_along(ours, bits, dim, shape[dim]), q)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim), signed(q, bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape,dim", [((5, 37), 1), ((33, 3), 0), ((2, 7, 96), 1), ((1,), 0), ((4, 1, 40), -1)])
def test_bytewise_pack_equals_the_general_slot_loop(bits, shape, dim, monkeypatch):
    from moecompress.quant import pack

    q = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    fast = pack_along(q, bits, dim)
    fast_back = unpack_along(fast, bits, dim, shape[dim])
    monkeypatch.setattr(pack, "_bytewise", lambda bits: False)
    slow = pack_along(q, bits, dim)
    assert torch.equal(fast, slow)
    assert torch.equal(fast_back, q)
    assert torch.equal(unpack_along(slow, bits, dim, shape[dim]), q)


def test_pack_3bit_straddles_words_by_hand():
    # element i occupies stream bits [3i, 3i+3): element 10 -> bits 30,31 of word 0 and bit 0 of word 1
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 10] = 0b111
    q[0, 21] = 0b101  # stream bits 63..65: bit 31 of word 1, bits 0..1 of word 2
    w = pack_along(q, 3, 1)
    assert w.shape == (1, 3)
    assert w[0, 0].item() == -(1 << 31) + (1 << 30)  # 0xC0000000 as int32
    assert w[0, 1].item() == 1 - (1 << 31)  # 0x80000001
    assert w[0, 2].item() == 0b10


def test_pack_batched_leading_dims():
    q = torch.randint(0, 8, (4, 6, 40), dtype=torch.uint8)
    packed = pack_along(q, 3, dim=-1)
    for i in range(4):
        assert torch.equal(packed[i], pack_along(q[i], 3, dim=1))
    assert torch.equal(unpack_along(packed, 3, -1, 40), q)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_along(torch.tensor([[16]], dtype=torch.uint8), 4, 1)


def test_awq_interleave_matches_ct_autoawq_converter():
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    q = torch.randint(0, 16, (6, 32), dtype=torch.uint8)  # [K, N], AWQ packs along N
    words = pack_along(awq_interleave(q, dim=1), 4, dim=1)
    iw, _ = AutoAWQConverter.unpack_awq(words, None, 4)
    iw, _ = AutoAWQConverter.reverse_awq_order(iw, None, 4)
    assert torch.equal(torch.bitwise_and(iw, 15).to(torch.uint8), q)
    assert torch.equal(awq_deinterleave(unpack_along(words, 4, 1, 32), dim=1), q)


# ---------------------------------------------------------------- encode / decode vs CT


def ct_scheme(spec: QuantSpec):
    cfg = QuantizationConfig.model_validate(ct.quantization_config(spec, []))
    return cfg.config_groups["group_0"]


CASES = [
    (bits, sym, gs)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for gs in (32, None)
]


@pytest.mark.parametrize("bits,sym,gs", CASES)
def test_ct_decompress_of_our_encoding_is_exact(bits, sym, gs):
    spec = QuantSpec(bits=bits, group_size=gs, symmetric=sym)
    k = 128 if gs else 100  # per-channel: a K that does not fill the last word
    qw = make_qw(40, k, spec, seed=bits)  # N=40: zero points do not fill the last word either
    enc = ct.encode_linear(qw, torch.float32)
    assert enc["weight_packed"].shape == (40, packed_length(k, bits))
    assert enc["weight_shape"].dtype == torch.int64 and enc["weight_shape"].tolist() == [40, k]
    assert enc["weight_scale"].dtype == torch.float32 and enc["weight_scale"].shape == qw.scales.shape
    if sym:
        assert "weight_zero_point" not in enc
    else:
        assert enc["weight_zero_point"].shape == (packed_length(40, bits), qw.scales.shape[1])
        assert enc["weight_zero_point"].dtype == torch.int32
    out = PackedQuantizationCompressor.decompress(dict(enc), ct_scheme(spec))
    assert torch.equal(out["weight"], qw.dequantize())
    back = ct.decode_linear(enc, spec)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales) and back.g_idx is None


@pytest.mark.parametrize("bits,sym,gs", CASES)
def test_ct_own_compress_gives_our_tensors(bits, sym, gs):
    spec = QuantSpec(bits=bits, group_size=gs, symmetric=sym)
    qw = make_qw(64, 128, spec, seed=10 + bits)
    state = {"weight": qw.dequantize(), "weight_scale": qw.scales.clone()}
    if not sym:
        state["weight_zero_point"] = signed(qw.zeros, bits)
    theirs = PackedQuantizationCompressor.compress(state, ct_scheme(spec))
    ours = ct.encode_linear(qw, torch.float32)
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


def test_bf16_scales_dequantize_identically():
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    qw = make_qw(32, 64, spec, scale_dtype=torch.bfloat16)
    enc = ct.encode_linear(qw, torch.bfloat16)
    assert enc["weight_scale"].dtype == torch.bfloat16
    out = PackedQuantizationCompressor.decompress(dict(enc), ct_scheme(spec))
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], qw.dequantize(torch.bfloat16))


def test_rejects_g_idx_and_group_act_order():
    spec = QuantSpec(bits=4, group_size=32)
    qw = make_qw(8, 64, spec)
    qw.g_idx = torch.randperm(64).div(32, rounding_mode="floor").to(torch.int32)
    with pytest.raises(UserError, match="g_idx"):
        ct.encode_linear(qw, torch.float16)
    with pytest.raises(UserError, match="act_order"):
        ct.quantization_config(QuantSpec(bits=4, group_size=32, act_order="group"), [])


def test_symmetric_requires_standard_zero_point():
    spec = QuantSpec(bits=4, group_size=32)
    qw = make_qw(8, 64, spec)
    qw.zeros[0, 0] = 3
    with pytest.raises(ValueError):
        ct.encode_linear(qw, torch.float16)


# ---------------------------------------------------------------- quantization_config


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=128, symmetric=True),
        QuantSpec(bits=3, group_size=64, symmetric=False, act_order="weight"),
        QuantSpec(bits=8, group_size=None, symmetric=True),
    ],
)
def test_quantization_config_validates(spec):
    ignore = ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate", "lm_head"]
    cfg = ct.quantization_config(spec, ignore)
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert cfg["quantization_status"] == "compressed"
    parsed = QuantizationConfig.model_validate(cfg)
    w = parsed.config_groups["group_0"].weights
    assert parsed.config_groups["group_0"].targets == ["Linear"]
    assert parsed.config_groups["group_0"].input_activations is None
    assert (w.num_bits, w.type, w.symmetric, w.dynamic) == (spec.bits, "int", spec.symmetric, False)
    assert w.strategy == ("channel" if spec.group_size is None else "group")
    assert w.group_size == spec.group_size
    assert w.actorder == spec.act_order
    assert parsed.ignore == ignore and parsed.format == "pack-quantized"
    assert parsed.quantization_status == "compressed"
    # what CT itself would serialize from our config parses back to the same thing
    dumped = parsed.model_dump(mode="json")
    assert QuantizationConfig.model_validate(dumped) == parsed
    for key, value in dumped["config_groups"]["group_0"]["weights"].items():
        assert cfg["config_groups"]["group_0"]["weights"][key] == value, key
    # and transformers accepts it
    from transformers.utils.quantization_config import CompressedTensorsConfig

    hf = CompressedTensorsConfig.from_dict(dict(cfg))
    assert hf.quantization_config.format == "pack-quantized"
