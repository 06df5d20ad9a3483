"""Our checkpoints load in transformers (+ compressed-tensors) and match our own dequantized weights."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, quick_config
from moecompress.checkpoint.dequant import write_dequantized
from moecompress.checkpoint.reader import CheckpointReader
from moecompress.pipeline import quantize

LAYOUTS = [(f, False) for f in FAMILIES] + [("qwen3_5_moe", True)]


def _load(path, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32,
                                                experts_implementation="eager")


@pytest.mark.parametrize("family,fused", LAYOUTS, ids=[f + ("-fused" if x else "") for f, x in LAYOUTS])
def test_compressed_tensors_loads_in_transformers(tiny_ckpt, tmp_path, family, fused):
    src = tiny_ckpt(family, fused_experts=True) if fused else tiny_ckpt(family)
    out = tmp_path / "q"
    quantize(src, out, quick_config(bits=4))
    model, info = _load(out, family)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    twin, info2 = _load(write_dequantized(out, tmp_path / "deq"), family)
    assert not info2["missing_keys"] and not info2["unexpected_keys"]
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, twin(ids).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, f"{family}: transformers vs our dequantized weights, relative error {rel:.2e}"
    # and the quantization did something: the float source differs from both
    src_model, _ = _load(src, family)
    with torch.no_grad():
        c = src_model(ids).logits
    assert ((c - b).norm() / c.norm()).item() > 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_routers_saved_bit_exact(tiny_ckpt, tmp_path, family, fmt):
    src = tiny_ckpt(family, dtype=torch.bfloat16)
    out = tmp_path / "q"
    quantize(src, out, quick_config(format=fmt, router_dtype="float32"))
    r_src, r_out = CheckpointReader.open(src), CheckpointReader.open(out)
    routers = [n for n in r_src.names() if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight",
                                                         "shared_expert_gate.weight", "e_score_correction_bias"))]
    assert len(routers) >= 2
    for n in routers:
        a, b = r_src.get(n), r_out.get(n)
        assert a.dtype == b.dtype, n
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.uint8) if b.dtype == torch.bfloat16 else b), n
        assert r_src.tensors[n].dtype == r_out.tensors[n].dtype
    kept = r_out.config["quantization_config"]
    listed = str(kept.get("ignore", kept.get("dynamic")))
    assert "mlp.gate" in listed or "mlp\\\\.gate" in listed


def test_per_expert_names_follow_save_pretrained(tiny_ckpt, tmp_path):
    out = tmp_path / "q"
    quantize(tiny_ckpt("mixtral"), out, quick_config())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight_packed" in keys
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_scale" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(k.startswith("model.layers.0.mlp.") for k in keys)
