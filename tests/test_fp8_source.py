"""FP8 source checkpoints (DeepSeek-V3-style fine-grained FP8, compressed-tensors float-quantized) read as
their float model by every tool: checked against transformers' and compressed-tensors' own dequantization."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import quick_config, run_cli
from moecompress.quant.formats import fp8


def _loop_dequant(q, s, bm, bn):
    """Element by element: w[r, c] = q[r, c] * s[r // bm, c // bn]."""
    out = torch.empty(q.shape, dtype=torch.float32)
    qf, sf = q.float(), fp8.scale_values(s)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c] = qf[r, c] * sf[r // bm, c // bn]
    return out


@pytest.mark.parametrize("n,k,block", [(70, 45, (32, 16)), (64, 64, (32, 32)), (5, 130, (128, 128))])
def test_dequantize_matches_an_element_loop_on_ragged_blocks(gen, n, k, block):
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4
    q, s = fp8.quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (math.ceil(n / block[0]), math.ceil(k / block[1]))
    got = fp8.dequantize(q, s, block, torch.float32)
    assert torch.equal(got, _loop_dequant(q, s, *block))
    # e4m3 keeps 3 mantissa bits: every weight within 1/16 of itself (or of the block's smallest step)
    step = s.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k] * 2.0 ** -9
    assert bool(((got - w).abs() <= w.abs() / 16 + step).all())
    assert torch.equal(fp8.dequantize(q, s, block, torch.bfloat16), got.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_table_conversion_equals_torch_on_every_code(dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    ref, got = codes.to(torch.float32), fp8.to_float32(codes)
    assert torch.equal(ref.isnan(), got.isnan())
    assert torch.equal(ref.nan_to_num(0.5), got.nan_to_num(0.5)) and torch.equal(ref.signbit(), got.signbit())


def test_dequantize_stacked_experts_per_tensor_and_e8m0_scales(gen):
    w = torch.randn(3, 64, 96, generator=gen)
    q, s = fp8.quantize(w, (32, 32))
    assert tuple(s.shape) == (3, 2, 3)
    got = fp8.dequantize(q, s, (32, 32), torch.float32)
    for e in range(3):
        assert torch.equal(got[e], _loop_dequant(q[e], s[e], 32, 32))
    qt, st = fp8.quantize(w[0], None)
    assert st.numel() == 1
    assert torch.equal(fp8.dequantize(qt, st, (64, 96), torch.float32), qt.float() * st)
    e8m0 = torch.tensor([[120, 127], [130, 1]], dtype=torch.uint8)  # 2**(b - 127)
    assert torch.equal(fp8.scale_values(e8m0), torch.tensor([[2.0 ** -7, 1.0], [8.0, 2.0 ** -126]]))


def test_dequantize_equals_transformers_and_compressed_tensors(gen):
    """Bit for bit what transformers' Fp8Dequantize (its CPU fallback) and compressed-tensors' dequantize give."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = torch.randn(4, 128, 96, generator=gen)
    q, s = fp8.quantize(w, (32, 32))
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(fp8.dequantize(q, s, (32, 32), torch.bfloat16), theirs)

    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    for strategy, block, extra in (("block", (32, 32), {"block_structure": [32, 32]}), ("tensor", None, {})):
        q2, s2 = fp8.quantize(w[0], block)
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **extra)
        ref = ct_dequantize(x_q=q2, scale=s2, args=args, dtype=torch.float32)
        ours = fp8.dequantize(q2, s2, fp8.block_of(q2.shape, s2.shape, (), "w"), torch.float32)
        assert torch.equal(ours, ref), strategy


@pytest.mark.parametrize("shape,strategy,block", [((96, 64), "block", (64, 64)), ((200, 256), "block", (128, 128)),
                                                  ((80, 70), "group", (1, 32)), ((48, 40), "channel", None)])
def test_compressed_tensors_scales_tile_as_their_config_says(gen, shape, strategy, block):
    """Edge blocks are partial (ceil grid): 96 rows in 64-row blocks are not 48-row blocks."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

    w = torch.randn(*shape, generator=gen) * torch.linspace(0.01, 10, shape[0])[:, None]
    if strategy == "channel":
        s = (w.abs().amax(1, keepdim=True) / 448).float()
        q = (w / s).to(torch.float8_e4m3fn)
        extra = {}
    else:
        q, s = fp8.quantize(w, block)
        extra = {"block_structure": list(block)} if strategy == "block" else {"group_size": block[1]}
    group = {"weights": dict(num_bits=8, type="float", symmetric=True, strategy=strategy, **extra)}
    scheme = fp8.scheme_from_config({"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "config_groups": {"group_0": group}})
    got = fp8.dequantize(q, s, fp8.block_of(q.shape, s.shape, scheme.blocks, "w"), torch.float32)
    assert torch.equal(got, _loop_dequant(q, s, *fp8.block_of(q.shape, s.shape, scheme.blocks, "w")))
    if strategy != "group":  # compressed-tensors' own dequantize (its group path wants exact groups)
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, **extra)
        assert torch.equal(got, ct_dequantize(x_q=q, scale=s, args=args, dtype=torch.float32))
    assert float((got - w).norm() / w.norm()) < 0.05


def test_fp8_tensors_without_an_fp8_config_are_refused(tiny_ckpt, tmp_path, capsys):
    from moecompress.tiny import save_fp8

    path = save_fp8(tiny_ckpt("qwen3_moe", dtype=torch.bfloat16), tmp_path / "m", block=(32, 32))
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    rc, err = run_cli(capsys, "inspect", path)
    assert rc == 2 and len(err) == 1 and "is stored in FP8 but config.json declares no FP8" in err[0], err


@pytest.fixture(scope="module")
def fp8_models(tiny_ckpt, tmp_path_factory):
    """{family: (bf16 original, its FP8 release in 32x32 blocks)} for a GQA and an MLA family."""
    from moecompress.tiny import save_fp8

    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for family in ("qwen3_moe", "deepseek_v3"):
        src = tiny_ckpt(family, dtype=torch.bfloat16)
        out[family] = (src, save_fp8(src, root / family, block=(32, 32)))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_release_loads_like_transformers_reads_it(fp8_models, family):
    """transformers (FP8 dequantized on a CPU) and our loader build the same bf16 model: same weights, same logits."""
    from transformers import AutoModelForCausalLM

    from moecompress.checkpoint.load import load_model

    _, path = fp8_models[family]
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    handle, ours = load_model(path, dtype=torch.bfloat16)
    assert type(handle.reader).__name__ == "Fp8SourceReader"
    mine, ref = ours.state_dict(), theirs.state_dict()
    quantized = [n for n in ref if ".layers." in n and ref[n].dim() >= 2 and "norm" not in n and ".gate." not in n]
    assert len(quantized) >= 6
    for name, t in ref.items():  # (DeepSeek's routers: transformers keeps them in fp32, we load them in bf16)
        assert torch.equal(mine[name], t.to(mine[name].dtype)), name
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    if family == "qwen3_moe":
        assert torch.equal(a, b)
    else:  # the router's precision differs (see above)
        assert (a - b).abs().max() <= 0.05 * b.abs().max()


def _bf16_conversion(fp8_dir, dst):
    """The bf16 checkpoint an FP8 release (32x32 blocks) stands for, made with transformers' dequantizer (not ours)."""
    import shutil

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    shutil.copytree(fp8_dir, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)

    def dequant(q, s):
        if q.shape[-2] % s.shape[-2] == 0 and q.shape[-1] % s.shape[-1] == 0:
            return Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
        # transformers refuses partial blocks (GLM-4.7-Flash's 80-row weights in 32-row blocks): the element loop
        return _loop_dequant(q, s, 32, 32).to(torch.bfloat16)

    out = {n: dequant(t, sd[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
           for n, t in sd.items() if not n.endswith("_scale_inv")}
    save_file(out, f, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _shard_digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_quantize_of_an_fp8_release_equals_quantize_of_its_bf16_conversion(fp8_models, tmp_path, family):
    from moecompress.pipeline import quantize

    _, path = fp8_models[family]
    bf16 = _bf16_conversion(path, tmp_path / "bf16")
    cfg = quick_config(method="gptq", calib_samples=4, seq_len=32)
    quantize(path, tmp_path / "q_fp8", cfg)
    quantize(bf16, tmp_path / "q_bf16", cfg)
    assert _shard_digest(tmp_path / "q_fp8") == _shard_digest(tmp_path / "q_bf16")
    config = json.loads((tmp_path / "q_fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"


def test_compressed_tensors_fp8_release_reads_as_its_float_model(tiny_ckpt, tmp_path):
    """GLM-4.7-Flash's shapes in 64 x 64 blocks: its 80-row kv_a_proj_with_mqa has partial edge blocks."""
    from moecompress.arch.handle import ModelHandle
    from moecompress.tiny import save_fp8

    src = tiny_ckpt("glm4_moe_lite", dtype=torch.bfloat16)
    ct_dir = save_fp8(src, tmp_path / "ct", block=(64, 64), layout="compressed-tensors")
    ct = ModelHandle.open(ct_dir).reader
    blocky = ModelHandle.open(save_fp8(src, tmp_path / "b", block=(64, 64))).reader
    per_tensor = ModelHandle.open(save_fp8(src, tmp_path / "t", block=None, layout="compressed-tensors")).reader
    assert "quantization_config" not in ct.config and ct.scheme.method == "compressed-tensors"
    original = load_file(next(src.glob("*.safetensors")))
    assert set(ct.names()) == set(blocky.names()) == set(original)
    raw = load_file(next(ct_dir.glob("*.safetensors")))
    ragged = [n for n in ct.scales if raw[n].shape[-2] % 64]
    assert any("kv_a_proj_with_mqa" in n for n in ragged)
    for name in ct.scales:
        assert torch.equal(ct.get(name), blocky.get(name)), name  # same blocks, same scales
        if name in ragged:  # element by element (slow: the ragged ones only)
            ref = _loop_dequant(raw[name], raw[name + "_scale"], 64, 64).to(torch.bfloat16)
            assert torch.equal(ct.get(name), ref), name
        err = (per_tensor.get(name).float() - original[name].float()).norm() / original[name].float().norm()
        assert 0 < err < 0.05, name  # e4m3: a few percent at most


def test_inspect_and_eval_name_the_fp8_source(fp8_models, capsys, tmp_path):
    from moecompress.inspect import describe

    src, path = fp8_models["qwen3_moe"]
    d = describe(path)
    assert d["fp8_source"].startswith("FP8 e4m3, 32x32 blocks") and d["quantization"] is None
    assert describe(src)["fp8_source"] is None
    # the int4 estimate counts the float model it reads, so it is the bf16 original's
    assert d["size_estimate_bytes"]["int4"] == pytest.approx(describe(src)["size_estimate_bytes"]["int4"], rel=0.02)
    rc, err = run_cli(capsys, "eval", path, "--reference", src, "--samples", 2, "--seq-len", 32,
                      "--json", tmp_path / "e.json")
    assert rc == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["quantization"]["method"] == "fp8" and 8 < e["bits_per_weight"] < 8.1  # one fp32 scale per 1024
    assert 0 < e["kl"] < 1e-3


def _fp8_variant(src, tmp_path, edit):
    from moecompress.tiny import save_fp8

    path = save_fp8(src, tmp_path / "v", block=(32, 32))
    f = next(path.glob("*.safetensors"))
    sd = load_file(f)
    edit(sd, path)
    save_file(sd, f, metadata={"format": "pt"})
    return path


def _set_config(path, **kw):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(kw)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit,message", [
    (lambda sd, p: sd.pop("model.layers.0.self_attn.q_proj.weight_scale_inv"), "hold no scale"),
    (lambda sd, p: sd.update({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(3, 3)}),
     "does not tile its weight"),
    (lambda sd, p: _set_config(p, weight_block_size=[0, 128]), "weight_block_size must be two positive"),
    (lambda sd, p: _set_config(p, fmt="e2m1"), "fmt 'e2m1' cannot be read"),
])
def test_broken_fp8_checkpoints_fail_in_one_line(tiny_ckpt, tmp_path, capsys, edit, message):
    path = _fp8_variant(tiny_ckpt("qwen3_moe", dtype=torch.bfloat16), tmp_path, edit)
    rc, err = run_cli(capsys, "quantize", path, "--out", tmp_path / "q", "--method", "rtn")
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "q").exists()


def test_runtime_runs_an_fp8_release_as_its_bf16_conversion(fp8_models, tmp_path):
    from moecompress.runtime import Runtime

    _, path = fp8_models["deepseek_v3"]
    bf16 = _bf16_conversion(path, tmp_path / "bf16")
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    a = Runtime.load(path).generate(prompt, 32, stop_ids=[], keep_logits=True)
    b = Runtime.load(bf16).generate(prompt, 32, stop_ids=[], keep_logits=True)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 32
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("family,kw", [(f, {}) for f in ("qwen2_moe", "mixtral", "olmoe", "glm4_moe", "glm4_moe_lite",
                                                         "qwen3_5_moe", "qwen3_next", "deepseek_v2", "deepseek_v32", "glm_moe_dsa")] + [("qwen3_5_moe", {"fused_experts": True})])
def test_every_family_reads_an_fp8_release_as_its_bf16_conversion(tiny_ckpt, tmp_path, family, kw):
    """Per-expert and fused 3D experts (official Qwen3.5/3.6 layout: ``experts.gate_up_proj_scale_inv``)."""
    from moecompress.checkpoint.load import load_model
    from moecompress.tiny import save_fp8

    path = save_fp8(tiny_ckpt(family, dtype=torch.bfloat16, **kw), tmp_path / "fp8", block=(32, 32))
    if kw:
        assert any(n.endswith("experts.gate_up_proj_scale_inv") for n in load_file(next(path.glob("*.safetensors"))))
    bf16 = _bf16_conversion(path, tmp_path / "bf16")
    _, a = load_model(path, dtype=torch.bfloat16)
    _, b = load_model(bf16, dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


def test_plan_sizes_an_fp8_release_like_its_float_original(fp8_models):
    from moecompress.runtime.plan import model_parts

    src, path = fp8_models["deepseek_v3"]
    a, b = model_parts(path), model_parts(src)
    assert [p.nbytes for p in a.dense] == [p.nbytes for p in b.dense] and a.experts == b.experts
