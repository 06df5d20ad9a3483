"""Our checkpoints load in transformers (+ compressed-tensors) and match our own dequantized weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, quick_config
from moecompress.checkpoint.dequant import write_dequantized
from moecompress.checkpoint.load import load_model
from moecompress.checkpoint.reader import CheckpointReader
from moecompress.errors import UserError
from moecompress.pipeline import quantize

# how the source stores its tensors: save_pretrained's default (per expert, the family's original names),
# official Qwen3.5 shards (fused 3D experts), or transformers 5's in-memory names
# (save_pretrained(save_original_format=False): fused experts under ``mlp.`` for every family)
SOURCES = {"default": {}, "fused": {"fused_experts": True}, "in-memory": {"original_format": False}}
LAYOUTS = ([(f, "default") for f in FAMILIES] + [("qwen3_5_moe", "fused")]
           + [(f, "in-memory") for f in FAMILIES])
# dense decoder layers inside MoE models, configured the Qwen way (tiny models have 2 layers)
DENSE = [
    ("qwen3_moe", dict(mlp_only_layers=[0]), [0]),
    ("qwen2_moe", dict(mlp_only_layers=[1]), [1]),
    ("qwen3_moe", dict(decoder_sparse_step=2), [0]),
    ("qwen2_moe", dict(decoder_sparse_step=2), [0]),
]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32,
                                                experts_implementation="eager")


def check_loads_and_matches_dequantized(src, out, tmp_path, what: str):
    """``out`` (quantized from ``src``) loads in transformers with no missing/unexpected/mismatched keys,
    and its logits equal those of our own dequantized weights (and differ from the float source)."""
    model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    twin, info2 = _load(write_dequantized(out, tmp_path / "deq"))
    assert not info2["missing_keys"] and not info2["unexpected_keys"]
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, twin(ids).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 1e-5, f"{what}: transformers vs our dequantized weights, relative error {rel:.2e}"
    # and the quantization did something: the float source differs from both
    src_model, _ = _load(src)
    with torch.no_grad():
        c = src_model(ids).logits
    assert ((c - b).norm() / c.norm()).item() > 1e-4
    return model


@pytest.mark.parametrize("family,layout", LAYOUTS, ids=[f"{f}-{x}" for f, x in LAYOUTS])
def test_compressed_tensors_loads_in_transformers(tiny_ckpt, tmp_path, family, layout):
    src = tiny_ckpt(family, **SOURCES[layout])
    out = tmp_path / "q"
    quantize(src, out, quick_config(bits=4))
    check_loads_and_matches_dequantized(src, out, tmp_path, f"{family} ({layout} source)")


@pytest.mark.parametrize("family,overrides,dense", DENSE,
                         ids=[f + "-" + ",".join(f"{k}={v}" for k, v in o.items()) for f, o, _ in DENSE])
def test_dense_layers_in_moe_models_load_in_transformers(tiny_ckpt, tmp_path, family, overrides, dense):
    src = tiny_ckpt(family, **overrides)
    out = tmp_path / "q"
    summary = quantize(src, out, quick_config(bits=4))
    model = check_loads_and_matches_dequantized(src, out, tmp_path, f"{family} {overrides}")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for i, layer in enumerate(model.model.layers):
        is_dense = not hasattr(layer.mlp, "experts")
        assert is_dense == (i in dense), (i, type(layer.mlp).__name__)
        pre = f"model.layers.{i}.mlp."
        if is_dense:  # the dense MLP is quantized like any linear, no router or experts appear
            assert {pre + f"{p}.weight_packed" for p in ("gate_proj", "up_proj", "down_proj")} <= keys
            assert not any(k.startswith((pre + "experts.", pre + "gate.")) for k in keys)
            assert "mlp.experts.gate_up_proj" not in summary["layers"][i]["linears"]
        else:
            assert pre + "experts.7.down_proj.weight_packed" in keys and pre + "gate.weight" in keys


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "mixtral", "glm4_moe_lite"])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
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


@pytest.mark.parametrize("layout", ["default", "in-memory"])
def test_per_expert_names_follow_save_pretrained(tiny_ckpt, tmp_path, layout):
    out = tmp_path / "q"
    quantize(tiny_ckpt("mixtral", **SOURCES[layout]), out, quick_config())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight_packed" in keys
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_scale" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(k.startswith("model.layers.0.mlp.") for k in keys)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_5_moe", "glm4_moe_lite", "qwen3_next",
                                    "deepseek_v2", "exaone_moe"])
def test_output_does_not_depend_on_the_source_layout(tiny_ckpt, tmp_path, family):
    """The same weights saved with original or in-memory names give byte-identical outputs (RTN)."""
    outs = {}
    for layout in ("default", "in-memory"):
        outs[layout] = tmp_path / layout
        quantize(tiny_ckpt(family, **SOURCES[layout]), outs[layout], quick_config(method="rtn"))
    a, b = (CheckpointReader.open(p) for p in outs.values())
    assert set(a.names()) == set(b.names())
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in a.names())
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_quantized_lm_head(tiny_ckpt, tmp_path, fmt):
    """--quantize-lm-head: the head is packed (no float copy), left out of the kept list, and named in the
    format's switch; it is calibrated on the final-normed residual stream (GPTQ beats RTN on it)."""
    src = tiny_ckpt("qwen3_moe", vocab_size=264)  # GPTQ v1 packs rows by 8 at 4 bits
    out = tmp_path / "q"
    summary = quantize(src, out, quick_config(bits=4, format=fmt, quantize_lm_head=True))
    keys = set(CheckpointReader.open(out).names())
    assert "lm_head.weight" not in keys
    assert ("lm_head.weight_packed" if fmt == "compressed-tensors" else "lm_head.qweight") in keys
    assert "lm_head" not in summary["kept_in_float"]
    info = summary["lm_head"]
    assert 0 < info["output_rel_err"] < info["rtn_output_rel_err"], info
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        assert "lm_head" not in qcfg["ignore"]
        # named as well as covered by "Linear": vLLM's head (ParallelLMHead) is no Linear to its class matching
        assert qcfg["config_groups"]["group_0"]["targets"] == ["Linear", r"re:^(?:.*\.)?lm_head$"]
        # logits equal to our dequantized twin's: transformers used the quantized head
        check_loads_and_matches_dequantized(src, out, tmp_path, "quantized lm_head")
    else:
        assert qcfg["lm_head"] is True and not any("lm_head" in rule for rule in qcfg["dynamic"])
    w = load_model(out)[1].lm_head.weight  # our loader dequantizes the packed head
    source = load_model(src)[1].lm_head.weight
    assert 0 < ((w - source).norm() / source.norm()).item() < 0.2


def test_quantized_lm_head_refused_when_tied(tiny_ckpt, tmp_path):
    src = tiny_ckpt("qwen3_moe", tie_word_embeddings=True)
    with pytest.raises(UserError, match="tied"):
        quantize(src, tmp_path / "q", quick_config(bits=4, quantize_lm_head=True))
    assert not (tmp_path / "q").exists()
    with pytest.raises(UserError, match="multiples of 32"):  # refused before any work, not at export
        quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q", quick_config(bits=4, format="gptq", quantize_lm_head=True))


def test_nan_in_lm_head_is_one_line(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt("qwen3_moe"), src)
    (shard,) = src.glob("*.safetensors")
    sd = load_file(shard)
    sd["lm_head.weight"][3, 5] = float("nan")
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"^lm_head.weight has NaN/Inf"):
        quantize(src, tmp_path / "q", quick_config(bits=4, quantize_lm_head=True))
    assert not (tmp_path / "q").exists()


def test_inspect_counts_a_quantized_lm_head_as_quantized(tiny_ckpt, tmp_path, capsys):
    from moecompress.cli import main

    out = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), out, quick_config(bits=8, quantize_lm_head=True))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    kept = next(line for line in text.splitlines() if line.lstrip().startswith("kept"))
    quantized = next(line for line in text.splitlines() if line.lstrip().startswith("quantized"))
    assert "lm_head" in quantized and "lm_head" not in kept, text


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_an_mtp_layer_stored_as_a_layer_keeps_only_its_own_modules_in_float(tiny_ckpt, tmp_path, fmt):
    """DeepSeek-V3/R1 and GLM-4.5 store their MTP layer as ``model.layers.{num_hidden_layers}``: its per-expert
    linears stay in float by exact names. A rule per local name (``.*.layers.\\d+.mlp.experts.0.gate_proj``)
    would make GPTQModel/vLLM build every processed layer's experts in float and drop their packed weights."""
    import re

    src = tiny_ckpt("deepseek_v3")
    d = tmp_path / "src"
    shutil.copytree(src, d)
    tensors = load_file(d / "model.safetensors")
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    last = f"model.layers.{n - 1}."
    for k in [k for k in tensors if k.startswith(last)]:
        tensors[f"model.layers.{n}." + k[len(last):]] = tensors[k].clone()
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(128, 256)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "q"
    quantize(d, out, quick_config(method="rtn", format=fmt))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    rules = [k[2:] for k in qcfg["dynamic"] if k.startswith("-:")]

    def kept(name):  # GPTQModel dynamic_get / vLLM get_dynamic_override: re.match on the full name
        return any(re.match(r, name) for r in rules)

    for i in range(1, n):  # the processed MoE layers: experts quantized, routers kept
        assert not kept(f"model.layers.{i}.mlp.experts.0.gate_proj"), rules
        assert not kept(f"model.layers.{i}.mlp.experts.3.down_proj"), rules
        assert kept(f"model.layers.{i}.mlp.gate")
    assert kept(f"model.layers.{n}.mlp.experts.0.gate_proj") and kept(f"model.layers.{n}.eh_proj")
