"""`quantize --ignore REGEX`: chosen linears of chosen layers stay in float, and every format's loaders know it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import quick_config, run_cli
from moecompress.errors import UserError
from moecompress.quant.targets import Target, apply_ignore

LAYER = [Target("self_attn.q_proj", "attn"), Target("self_attn.o_proj", "attn"),
         Target("mlp.experts.gate_up_proj", "mlp_up", "gate_up"), Target("mlp.experts.down_proj", "mlp_down", "down")]


def test_a_fused_group_is_ignored_whole_or_not_at_all():
    """vLLM loads q/k/v (and gate/up, DeepSeek's q_a/kv_a) as one layer: it refuses one half-quantized."""
    layer = [Target("self_attn.q_proj", "attn"), Target("self_attn.k_proj", "attn"), Target("self_attn.v_proj", "attn"),
             Target("mlp.shared_expert.gate_proj", "mlp_up"), Target("mlp.shared_expert.up_proj", "mlp_up")]
    with pytest.raises(UserError, match=r"keeps layers\.0\.self_attn\.q_proj in float but not k_proj, v_proj: .*"
                                        r"one fused layer; ignore all of them, e.g. 'layers\\\.0\\\.self_attn\\\.\(q_proj\|k_proj\|v_proj\)\$'"):
        apply_ignore([layer], [r"q_proj"])
    with pytest.raises(UserError, match=r"shared_expert\.up_proj in float but not gate_proj"):
        apply_ignore([layer], [r"up_proj"])
    kept, ignored = apply_ignore([layer], [r"self_attn\.(q|k|v)_proj", r"shared_expert\.(gate|up)"])
    assert kept == [[]] and len(ignored) == 5


def test_awq_never_balances_from_an_ignored_linear(tiny_ckpt, tmp_path):
    """Its weight is written as the source's: a v -> o or up -> down group from it would scale only the reader."""
    from moecompress.pipeline import quantize

    summary = quantize(tiny_ckpt("qwen2_moe"), tmp_path / "q",
                       quick_config(method="awq", ignore=[r"layers\.1\.mlp\.shared_expert\.(gate|up)_proj",
                                                          r"layers\.1\.self_attn\.(q|k|v)_proj"]))
    sources = [{g["source"] for g in layer["awq"]} for layer in summary["layers"]]
    assert {"self_attn.v_proj", "mlp.shared_expert.up_proj"} <= sources[0]
    assert not {"self_attn.v_proj", "mlp.shared_expert.up_proj", "input_layernorm"} & sources[1]


def test_apply_ignore_keeps_matching_linears_of_matching_layers():
    kept, ignored = apply_ignore([LAYER, LAYER], [r"layers\.1\.self_attn\.o"])
    assert kept == [LAYER, [LAYER[0]] + LAYER[2:]] and ignored == ["layers.1.self_attn.o_proj"]
    assert apply_ignore([LAYER], []) == ([LAYER], [])
    with pytest.raises(UserError, match=r"matches the routed experts layers\.0\.mlp\.experts\.gate_up_proj"):
        apply_ignore([LAYER], ["experts"])
    with pytest.raises(UserError, match=r"'v_proj' matches no quantized linear \(names look like "
                                        r"'layers\.0\.self_attn\.q_proj'\)"):
        apply_ignore([LAYER], ["o_proj", "v_proj"])


def _original(path):
    return load_file(next(path.glob("*.safetensors")))


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_ignored_linears_are_float_in_the_checkpoint_and_for_its_loaders(tiny_ckpt, tmp_path, fmt):
    from moecompress.pipeline import quantize

    src = tiny_ckpt("qwen3_moe", dtype=torch.bfloat16)
    out = tmp_path / "q"
    summary = quantize(src, out, quick_config(method="gptq", format=fmt, ignore=[r"layers\.1\.self_attn\.(q|k|v)_proj"]))
    sd, orig = load_file(next(out.glob("*.safetensors"))), _original(src)
    for proj in ("q_proj", "k_proj"):  # byte for byte the source's
        assert torch.equal(sd[f"model.layers.1.self_attn.{proj}.weight"], orig[f"model.layers.1.self_attn.{proj}.weight"])
        packed = ".weight_packed" if fmt == "compressed-tensors" else ".qweight"
        assert f"model.layers.0.self_attn.{proj}{packed}" in sd and f"model.layers.1.self_attn.{proj}{packed}" not in sd
    assert f"model.layers.1.self_attn.o_proj{packed}" in sd
    assert "model.layers.1.self_attn.q_proj" in summary["kept_in_float"]
    assert "model.layers.0.self_attn.q_proj" not in summary["kept_in_float"]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        assert "model.layers.1.self_attn.q_proj" in qcfg["ignore"] and "model.layers.0.self_attn.q_proj" not in qcfg["ignore"]
    else:  # GPTQModel's negative rules must not catch layer 0's (quantized) q_proj
        rules = [k[2:] for k in qcfg["dynamic"] if k.startswith("-:")]
        assert any(re.match(r, "model.layers.1.self_attn.q_proj") for r in rules)
        assert not any(re.match(r, "model.layers.0.self_attn.q_proj") for r in rules)
        assert any(re.match(r, "model.layers.0.mlp.gate") for r in rules)  # routers: one rule for every layer
    # our own loader reads the mixed checkpoint: the float ones exactly, the others dequantized
    from moecompress.checkpoint.load import load_model

    _, model = load_model(out, dtype=torch.bfloat16)
    attn = model.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, orig["model.layers.1.self_attn.q_proj.weight"])
    assert not torch.equal(attn.o_proj.weight, orig["model.layers.1.self_attn.o_proj.weight"])


def test_transformers_loads_a_checkpoint_with_ignored_linears(tiny_ckpt, tmp_path):
    """compressed-tensors' ``ignore`` names them: stock transformers keeps them float (the source's weights), packs
    the rest, and computes what our dequantized twin computes."""
    from test_export_interop import check_loads_and_matches_dequantized

    from moecompress.pipeline import quantize

    src = tiny_ckpt("qwen3_moe")
    quantize(src, tmp_path / "q", quick_config(method="rtn", ignore=[r"layers\.0\.self_attn"]))  # q, k, v, o
    model = check_loads_and_matches_dequantized(src, tmp_path / "q", tmp_path, "--ignore")
    orig = _original(src)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert torch.equal(attn0.o_proj.weight.float(), orig["model.layers.0.self_attn.o_proj.weight"].float())
    assert not hasattr(attn1.o_proj, "weight") or not torch.equal(
        attn1.o_proj.weight.float(), orig["model.layers.1.self_attn.o_proj.weight"].float())


def test_bad_ignore_patterns_are_one_line(tiny_ckpt, tmp_path, capsys):
    src = tiny_ckpt("qwen3_moe")
    for pattern, message in (("(", "is not a regular expression"), ("experts", "always quantized"),
                             ("nothing_like_this", "matches no quantized linear")):
        rc, err = run_cli(capsys, "quantize", src, "--out", tmp_path / "q", "--method", "rtn", "--ignore", pattern)
        assert rc == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "q").exists()
