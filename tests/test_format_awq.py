"""AWQ GEMM encoding: words derived by hand from the documented layout, round trips, one-line refusals,
and whole checkpoints written by `moecompress quantize --format awq` read back by our reader, eval and
the runtime (and by compressed-tensors' own AutoAWQ converter, a third-party reader)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import quick_config
from moecompress.checkpoint.dequant import quantized_modules, read_quantized, spec_from_config
from moecompress.checkpoint.reader import CheckpointReader
from moecompress.cli import main
from moecompress.errors import UserError
from moecompress.pipeline import quantize
from moecompress.quant.formats import awq
from moecompress.quant.spec import QuantizedWeight, QuantSpec

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: bit slot i of a word holds column 8c + ORDER[i]


def to_int32(word: int) -> int:
    assert 0 <= word < 1 << 32
    return word - (1 << 32) if word >= 1 << 31 else word


def make_qw(n, k, spec, seed=0, scale_dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    g = k // spec.group_size
    q = torch.randint(0, 16, (n, k), generator=gen).to(torch.uint8)
    scales = (torch.rand(n, g, generator=gen) * 0.05 + 1e-3).to(scale_dtype).float()  # exact in scale_dtype
    if spec.symmetric:
        zeros = torch.full((n, g), 8, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 16, (n, g), generator=gen).to(torch.uint8)
    return QuantizedWeight(q, scales, zeros, spec)


def hand_word(codes) -> int:
    """The int32 AWQ stores for 8 consecutive output columns' codes, from the documented bit layout."""
    return to_int32(sum(int(codes[ORDER[i]]) << (4 * i) for i in range(8)))


# ------------------------------------------------------------------------------------------ layout


def test_words_by_hand():
    n, k, gs = 16, 4, 2
    spec = QuantSpec(bits=4, group_size=gs, symmetric=False)
    q = torch.zeros(n, k, dtype=torch.uint8)
    q[:, 0] = torch.arange(16)  # input row 0: output column j has code j
    q[:, 1] = 15 - torch.arange(16)
    q[:, 2] = torch.tensor([3, 0, 0, 0, 0, 0, 0, 9] * 2)
    q[:, 3] = 5
    zeros = torch.tensor([[(i + 3 * g) % 16 for g in range(2)] for i in range(n)], dtype=torch.uint8)
    scales = torch.tensor([[0.5 + 0.125 * i + g for g in range(2)] for i in range(n)])
    t = awq.encode_linear(QuantizedWeight(q, scales, zeros, spec), torch.float16)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (4, 2)  # [K, N/8]
    # columns 0..7 hold 0..7: slot i holds column ORDER[i], so the nibbles from slot 0 up read 0 2 4 6 1 3 5 7
    assert t["qweight"][0, 0].item() == 0x75316420
    assert t["qweight"][0, 1].item() == to_int32(0xFDB9ECA8)  # columns 8..15: bit 31 set -> negative
    assert t["qweight"][1, 0].item() == to_int32(0x8ACE9BDF)
    assert t["qweight"][2, 0].item() == to_int32(0x90000003)  # column 7 sits in the top slot, column 0 in the bottom
    assert t["qweight"][3].tolist() == [0x55555555, 0x55555555]
    for r in range(k):  # and every word by the general rule
        for c in range(2):
            assert t["qweight"][r, c].item() == hand_word(q[8 * c: 8 * c + 8, r])
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (2, 2)  # [G, N/8], raw zero points
    for g in range(2):
        for c in range(2):
            assert t["qzeros"][g, c].item() == hand_word(zeros[8 * c: 8 * c + 8, g])
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"], scales.t().half())  # [G, N]


def test_symmetric_stores_eight_in_every_zero_field():
    t = awq.encode_linear(make_qw(16, 64, QuantSpec(4, 32, True)), torch.float16)
    assert t["qzeros"].tolist() == [[to_int32(0x88888888)] * 2] * 2


def awq_dequant_by_hand(t: dict, gs: int) -> torch.Tensor:
    """W [N, K] = scales[k // gs, n] * (q[k, n] - z[k // gs, n]), fields unpacked by shifts and ORDER."""
    def unpack(words):
        w = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.empty(w.shape[0], w.shape[1] * 8, dtype=torch.int64)
        for c in range(w.shape[1]):
            for i in range(8):
                out[:, 8 * c + ORDER[i]] = (w[:, c] >> (4 * i)) & 15
        return out
    q, z, s = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"].float()
    gi = torch.arange(q.shape[0]) // gs
    return (s[gi] * (q - z[gi]).float()).t()


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_trip(sym, gs, dtype):
    spec = QuantSpec(4, gs, sym)
    qw = make_qw(24, 256, spec, seed=gs, scale_dtype=dtype)
    t = awq.encode_linear(qw, dtype)
    assert t["scales"].dtype == dtype
    back = awq.decode_linear(t, spec)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales) and back.g_idx is None
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(awq_dequant_by_hand(t, gs), qw.dequantize())


def test_fp32_models_store_fp16_scales():
    spec = QuantSpec(4, 32, False)
    qw = make_qw(8, 64, spec, scale_dtype=torch.float32)
    t = awq.encode_linear(qw, torch.float32)
    assert t["scales"].dtype == torch.float16
    assert torch.equal(awq.decode_linear(t, spec).scales, qw.scales.half().float())


def test_compressed_tensors_autoawq_converter_reads_our_tensors():
    """compressed-tensors' AutoAWQ -> pack-quantized converter (its own unpacking) gives our CT encoding.

    A symmetric weight is written with ``zero_point: true`` and zero points 8, so the converter (like every AWQ
    loader) reads it as an asymmetric weight whose zero points are all 8."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    from moecompress.quant.formats import compressed_tensors as ct

    for sym in (True, False):
        spec = QuantSpec(4, 32, sym)
        qw = make_qw(32, 128, spec, seed=int(sym), scale_dtype=torch.bfloat16)
        conv = AutoAWQConverter.from_autoawq_config(awq.quantization_config(spec, []))
        got = conv.process({f"m.{k}": v for k, v in awq.encode_linear(qw, torch.bfloat16).items()})
        as_read = QuantizedWeight(qw.qweight, qw.scales, qw.zeros, QuantSpec(4, 32, False))
        want = ct.encode_linear(as_read, torch.bfloat16)
        assert set(got) == {f"m.{k}" for k in want}
        for k, v in want.items():
            assert torch.equal(got[f"m.{k}"], v), (sym, k)


# ------------------------------------------------------------------------------------------ refusals


def test_refusals_are_one_line_user_errors():
    spec = QuantSpec(4, 32, False)

    def qw(n=8, g=2, sp=spec, scale=1.0, g_idx=None):
        return QuantizedWeight(torch.zeros(n, 64, dtype=torch.uint8), torch.full((n, g), scale),
                               torch.zeros(n, g, dtype=torch.uint8), sp, g_idx)

    cases = {
        "8-bit": qw(sp=QuantSpec(8, 32, False)),
        "act-order group": qw(sp=QuantSpec(4, 32, False, "group")),
        "g_idx": qw(g_idx=torch.arange(64, dtype=torch.int32) % 2),
        "N=12": qw(n=12),
        "per-channel": qw(g=1, sp=QuantSpec(4, None, False)),
        "fp16 overflow": qw(scale=1e6),
    }
    words = {"8-bit": "4-bit", "act-order group": "act_order 'group'", "g_idx": "g_idx", "N=12": "N=12",
             "per-channel": "per-channel", "fp16 overflow": "overflows float16"}
    for what, w in cases.items():
        with pytest.raises(UserError, match=words[what]) as e:
            awq.encode_linear(w, torch.float32)
        assert "\n" not in str(e.value), what


def test_decode_refuses_symmetric_config_with_other_zero_points():
    qw = make_qw(16, 64, QuantSpec(4, 32, False), seed=5)
    t = awq.encode_linear(qw, torch.float16)
    with pytest.raises(UserError, match="zero_point false"):
        awq.decode_linear(t, QuantSpec(4, 32, True))
    with pytest.raises(UserError, match="inconsistent AWQ shapes"):
        awq.decode_linear({**t, "qzeros": t["qzeros"][:, :1]}, QuantSpec(4, 32, False))


@pytest.mark.parametrize("args,msg", [
    (["--bits", "8"], "4-bit weights only"),
    (["--bits", "3"], "4-bit weights only"),
    (["--group-size", "-1"], "per-channel"),
    (["--act-order", "group", "--method", "gptq"], "GPTQ format"),
], ids=["bits8", "bits3", "per-channel", "act-order-group"])
def test_cli_refuses_before_any_work(capsys, tmp_path, tiny_ckpt, args, msg):
    out, src = tmp_path / "q", tiny_ckpt("qwen3_moe")
    capsys.readouterr()  # building the tiny checkpoint prints progress
    rc = main(["quantize", str(src), "--out", str(out), "--method", "rtn", "--format", "awq", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and msg in err[0], err
    assert not out.exists()


def test_recipe_rule():
    with pytest.raises(UserError, match=r"invalid setting.*AWQ format stores 4-bit weights only, not 8-bit"):
        quick_config(method="rtn", format="awq", bits=8)
    assert quick_config(method="rtn", format="awq").format == "awq"


def test_lm_head_vocab_must_pack_by_eight(tiny_ckpt, tmp_path):
    with pytest.raises(UserError, match="packs output channels by 8; lm_head has N=260"):
        quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q",  # 260 tokens: byte vocabulary + specials
                 quick_config(method="rtn", format="awq", quantize_lm_head=True))
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------ config


def test_quantization_config_and_our_reader_and_transformers_parse_it():
    from transformers import AwqConfig

    for sym in (True, False):
        spec = QuantSpec(4, 64, sym)
        cfg = awq.quantization_config(spec, ["model.layers.0.mlp.gate", "lm_head", "lm_head"], lm_head=False,
                                      dynamic_rules=[r".*\.layers\.\d+\.mlp\.gate$"])
        assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["bits"] == 4
        # zero_point: true either way (a symmetric weight's zero points are 8): what AutoAWQ writes and every
        # loader reads (transformers serializes an AutoAWQ config the same way: sym true, zero_point true)
        assert cfg["group_size"] == 64 and cfg["zero_point"] is True and cfg["sym"] is sym
        assert cfg["modules_to_not_convert"] == ["model.layers.0.mlp.gate", "lm_head"]
        assert cfg["dynamic"] == {r"-:.*\.layers\.\d+\.mlp\.gate$": {}}
        fmt, back = spec_from_config(json.loads(json.dumps(cfg)))
        assert fmt == "awq" and (back.bits, back.group_size, back.symmetric, back.act_order) == (4, 64, False, None)
        hf = AwqConfig.from_dict(json.loads(json.dumps(cfg)))
        assert (hf.bits, hf.group_size, hf.zero_point, hf.format) == (4, 64, True, "gemm")
        assert hf.modules_to_not_convert == cfg["modules_to_not_convert"]


def test_reader_takes_third_party_config_spellings():
    # AutoAWQ: upper-case version, no sym; AutoAWQ's quant_config.json spelling; per-channel
    assert spec_from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                             "version": "GEMM"})[1] == QuantSpec(4, 128, False, None, (1.0,))
    assert spec_from_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 32, "zero_point": False}
                            )[1] == QuantSpec(4, 32, True, None, (1.0,))
    per_channel = {"quant_method": "awq", "bits": 4, "group_size": -1, "zero_point": True}
    assert spec_from_config(per_channel)[1].group_size is None
    with pytest.raises(UserError, match="version 'gemv'"):
        spec_from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(UserError, match="8-bit AWQ"):
        spec_from_config({"quant_method": "awq", "bits": 8, "group_size": 128})


# ------------------------------------------------------------------------------------------ checkpoints


def _key(tensors: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
                 for k, v in sorted(tensors.items()) if k in awq.SUFFIXES)


@pytest.fixture
def capture_encoded(monkeypatch):
    """Record what export.encode is given: {bytes of the tensors it returned: in-memory QuantizedWeight}."""
    import moecompress.export as export

    seen: dict[tuple, list] = {}
    real = export.encode

    def spy(fmt, qw, dtype):
        out = real(fmt, qw, dtype)
        seen.setdefault(_key(out), []).append(qw)
        return out

    monkeypatch.setattr(export, "encode", spy)
    return seen


def _quantize_cli(src, out, *args):
    rc = main(["quantize", str(src), "--out", str(out), "--group-size", "32", "--calib-samples", "8",
               "--seq-len", "64", "--batch-size", "4", "--threads", "1", *args])
    assert rc == 0


@pytest.mark.parametrize("family,method,sym", [
    ("qwen3_moe", "rtn", False),
    ("mixtral", "rtn", True),
    ("qwen2_moe", "gptq", True),
], ids=["qwen3_moe-rtn-asym", "mixtral-rtn-sym", "qwen2_moe-gptq-sym"])
def test_quantize_awq_reads_back_the_in_memory_weights(tiny_ckpt, tmp_path, capture_encoded, family, method, sym):
    src = tiny_ckpt(family, dtype=torch.bfloat16)
    out = tmp_path / "q"
    _quantize_cli(src, out, "--method", method, "--format", "awq", "--sym" if sym else "--asym",
                  *(["--no-measure-errors"] if method == "rtn" else []))
    reader = CheckpointReader.open(out)
    qcfg = reader.config["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["zero_point"] is True and qcfg["group_size"] == 32
    assert not (out / "quantize_config.json").exists()
    fmt, spec, mods = quantized_modules(reader)
    assert fmt == "awq" and len(mods) >= 10
    # the family's own per-expert names, routers in float and listed
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    expert = "w1" if family == "mixtral" else "gate_proj"
    assert f"model.layers.0.{block}.experts.3.{expert}" in mods
    assert f"model.layers.0.{block}.gate.weight" in reader
    assert f"model.layers.0.{block}.gate" in qcfg["modules_to_not_convert"]
    assert "lm_head" in qcfg["modules_to_not_convert"]
    if family == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert_gate" in qcfg["modules_to_not_convert"]
    # every written module equals what the quantizer produced in memory (codes, zero points, scales: exactly)
    for m in mods:
        assert reader.tensors[f"{m}.qweight"].dtype == "I32" and reader.tensors[f"{m}.scales"].dtype == "BF16"
        candidates = capture_encoded[_key({s: reader.get(f"{m}.{s}") for s in awq.SUFFIXES})]
        back = read_quantized(reader, fmt, spec, m)
        assert any(torch.equal(back.qweight, qw.qweight) and torch.equal(back.zeros, qw.zeros)
                   and torch.equal(back.scales, qw.scales) and torch.equal(back.dequantize(), qw.dequantize())
                   for qw in candidates), m


def test_awq_and_compressed_tensors_exports_agree(tiny_ckpt, tmp_path):
    """Same quantization, two formats: compressed-tensors' own AutoAWQ converter turns our AWQ checkpoint into
    exactly our compressed-tensors one; our reader, `moecompress eval` and the runtime see the same model."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    from moecompress.runtime import Runtime

    src = tiny_ckpt("qwen3_moe", dtype=torch.bfloat16)
    outs = {}
    for fmt in ("awq", "compressed-tensors"):
        outs[fmt] = tmp_path / fmt
        quantize(src, outs[fmt], quick_config(method="rtn", format=fmt, symmetric=False))
    a, c = CheckpointReader.open(outs["awq"]), CheckpointReader.open(outs["compressed-tensors"])
    conv = AutoAWQConverter.from_autoawq_config(a.config["quantization_config"])
    converted = conv.process({n: a.get(n) for n in a.names()})
    assert set(converted) == set(c.names())
    for n in c.names():
        x, y = converted[n], c.get(n)
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y), n

    evals = {}
    for fmt, path in outs.items():
        js = tmp_path / f"{fmt}.json"
        assert main(["eval", str(path), "--reference", str(src), "--json", str(js), "--samples", "2",
                     "--seq-len", "16", "--batch-size", "2"]) == 0
        evals[fmt] = json.loads(js.read_text())
    assert evals["awq"]["ppl"] == evals["compressed-tensors"]["ppl"]
    assert evals["awq"]["kl"] == evals["compressed-tensors"]["kl"] > 0

    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    runs = {}
    for fmt, path in outs.items():
        rt = Runtime.load(path)
        assert rt.report.quant_format == fmt
        runs[fmt] = rt.generate(prompt, 8, stop_ids=[], keep_logits=True)
    assert runs["awq"].tokens == runs["compressed-tensors"].tokens
    for x, y in zip(runs["awq"].logits, runs["compressed-tensors"].logits):
        assert torch.equal(x, y)


def test_kernel_path_repacks_awq_at_load(tiny_ckpt, tmp_path):
    """The runtime's kernel path (Triton's interpreter on CPU) repacks AWQ's words for its kernels."""
    from moecompress.kernels import _common
    from moecompress.runtime import Runtime

    if not _common.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    out = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), out, quick_config(method="rtn", format="awq", symmetric=False))
    kern = Runtime.load(out, kernels=True)
    moe_layers = sum(type(layer.mlp).__name__ == "MoEBlock" for layer in kern.model.layers)
    assert kern.report.packed_linears > 0 and kern.report.packed_expert_layers == moe_layers >= 1
    assert not kern.report.dequantized
    cpu = Runtime.load(out, cpu_weights="dequantized")
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7))
    x = kern.generate(prompt, 3, stop_ids=[], keep_logits=True)
    y = cpu.generate(prompt, 3, stop_ids=[], keep_logits=True)
    assert x.tokens == y.tokens
    assert max(((p - q).norm() / q.norm()).item() for p, q in zip(x.logits, y.logits)) < 1e-4


def test_quantized_lm_head_and_inspect(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "q"
    src = tiny_ckpt("qwen3_moe", vocab_size=264)  # AWQ packs lm_head rows by 8
    summary = quantize(src, out, quick_config(method="rtn", format="awq", quantize_lm_head=True))
    reader = CheckpointReader.open(out)
    assert "lm_head.qweight" in reader and "lm_head.weight" not in reader
    qcfg = reader.config["quantization_config"]
    assert qcfg["lm_head"] is True and "lm_head" not in qcfg["modules_to_not_convert"]
    assert "lm_head" not in summary["kept_in_float"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "awq, int4, group 32, symmetric" in text  # stored with zero points 8; moecompress.json says symmetric
    quantized = next(line for line in text.splitlines() if line.lstrip().startswith("quantized"))
    assert "lm_head" in quantized and "experts.*.down_proj" in quantized


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_kernel_packing_drops_the_zero_points_of_a_symmetric_awq_weight(tiny_ckpt, tmp_path, sym):
    """The checkpoint stores a symmetric weight's zero points (8s, zero_point: true); the GPU kernels'
    packing finds them all 8 and runs the symmetric variant (no zero-point bytes), an asymmetric one keeps them."""
    from moecompress.runtime.convert import load_runtime_model
    from moecompress.runtime.qlinear import PackedWeight

    out = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), out, quick_config(method="rtn", format="awq", symmetric=sym))
    _, model, _ = load_runtime_model(out, torch.device("cpu"), torch.float32, use_kernels=True)
    packed = [m.get() for m in model.modules() if isinstance(m, PackedWeight)]
    assert len(packed) >= 8 and all((p.zeros is None) == sym for p in packed), [p.zeros is None for p in packed]
