"""``quantize --override``: other bit widths / group sizes for some linears, written so every loader reads them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import quick_config, run_cli
from moecompress.checkpoint.dequant import Schemes, quantized_modules, read_quantized, schemes_from_config
from moecompress.checkpoint.reader import CheckpointReader
from moecompress.errors import UserError
from moecompress.quant import overrides as ov
from moecompress.quant.spec import QuantSpec
from moecompress.quant.targets import Target

BASE = QuantSpec(4, 32)


def _targets():
    attn = [Target(f"self_attn.{p}_proj", "attn") for p in "qkvo"]
    shared = [Target(f"mlp.shared_expert.{p}_proj", "mlp_up" if p != "down" else "mlp_down")
              for p in ("gate", "up", "down")]
    experts = [Target("mlp.experts.gate_up_proj", "mlp_up", "gate_up"), Target("mlp.experts.down_proj", "mlp_down", "down")]
    return [attn + experts + shared, attn + experts + shared]


def test_parse_forms_and_errors():
    assert ov.parse("self_attn=8") == ov.Override("self_attn", 8, None)
    assert ov.parse("a|b=8/64") == ov.Override("a|b", 8, 64)
    assert ov.parse("x=/channel") == ov.Override("x", None, ov.CHANNEL)
    assert ov.parse("(?=q)=8").match == "(?=q)"  # the last '=' separates
    assert ov.Override("x", None, ov.CHANNEL).apply(BASE) == QuantSpec(4, None)
    assert ov.Override("x", 8).apply(BASE) == QuantSpec(8, 32)
    for bad in ("self_attn", "=8", "x=5", "x=8/48", "x=eight", "(=8", "x=/"):
        with pytest.raises(UserError):
            ov.parse(bad)


def test_assign_first_match_wins_and_leaves_the_base_implicit():
    specs = ov.assign(_targets(), [ov.parse(r"layers\.1\.self_attn=8/16"), ov.parse("self_attn=8"),
                                   ov.parse("shared_expert=4/32")], BASE)
    assert specs["layers.1.self_attn.q_proj"] == QuantSpec(8, 16)
    assert specs["layers.0.self_attn.o_proj"] == QuantSpec(8, 32)
    assert not any("shared_expert" in n for n in specs)  # the same as the base: nothing to record
    assert not any("experts." in n for n in specs)


@pytest.mark.parametrize("pattern,message", [
    ("experts", "routed experts"),
    ("nothing_like_this", "matches no quantized linear"),
    (r"self_attn\.q_proj", "fused layer"),
    (r"shared_expert\.(gate|down)", "fused layer"),
])
def test_assign_refuses(pattern, message):
    with pytest.raises(UserError, match=message):
        ov.assign(_targets(), [ov.parse(f"{pattern}=8")], BASE)


def test_recipe_takes_both_spellings_and_refuses_the_awq_format():
    from moecompress.recipe import build_config

    cfg = build_config(overrides=["self_attn=8", {"match": "shared", "group_size": "channel"}])
    assert cfg.override_list() == [ov.Override("self_attn", 8, None), ov.Override("shared", None, ov.CHANNEL)]
    with pytest.raises(UserError, match="unknown key"):
        build_config(overrides=[{"match": "a", "bits": 8, "sym": False}])
    with pytest.raises(UserError, match="AWQ format has one bit width"):
        build_config(format="awq", overrides=["self_attn=8"])


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_overridden_linears_are_stored_and_read_at_their_own_precision(tiny_ckpt, tmp_path, fmt):
    """int8 attention beside int4 experts: the stored codes use the 8-bit range, our reader decodes each module
    with its own scheme, and the 8-bit attention is far closer to the float weights than the int4 run's."""
    from moecompress.pipeline import quantize

    src = tiny_ckpt("qwen2_moe")
    orig = load_file(next(src.glob("*.safetensors")))
    runs = {}
    for name, extra in (("w4", {}), ("mixed", {"overrides": ["self_attn|shared_expert=8/16"]})):
        summary = quantize(src, tmp_path / name, quick_config(method="gptq", format=fmt, **extra))
        r = CheckpointReader.open(tmp_path / name)
        f, schemes, mods = quantized_modules(r)
        runs[name] = {m: read_quantized(r, f, schemes, m) for m in mods}
    assert summary["schemes"][0]["bits"] == 8 and summary["schemes"][0]["linears"] == 14
    mixed, w4 = runs["mixed"], runs["w4"]
    assert mixed.keys() == w4.keys()
    for m, qw in mixed.items():
        wide = "self_attn" in m or "shared_expert." in m
        assert qw.spec.bits == (8 if wide else 4) and qw.spec.group_size == (16 if wide else 32), m
        assert int(qw.qweight.max()) > 15 if wide else int(qw.qweight.max()) <= 15, m
        e8, e4 = _rel(qw.dequantize(), orig[m + ".weight"]), _rel(w4[m].dequantize(), orig[m + ".weight"])
        if wide:
            assert e8 < 0.1 * e4, f"{m}: int8 {e8:.4f} vs int4 {e4:.4f}"
    if fmt == "gptq":  # every spelling a loader matches: GPTQModel's module names, vLLM's fused layers
        qcfg = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]

        def rule(name):  # vLLM's / GPTQModel's reading: the first rule that re.match-es decides
            for k, v in qcfg["dynamic"].items():
                if re.match(k.removeprefix("-:").removeprefix("+:"), name):
                    return "float" if k.startswith("-:") else v
            return "base"

        assert rule("model.layers.1.self_attn.qkv_proj") == {"bits": 8, "group_size": 16}
        assert rule("model.layers.0.mlp.shared_expert.gate_up_proj") == {"bits": 8, "group_size": 16}
        assert rule("model.layers.0.self_attn.o_proj") == {"bits": 8, "group_size": 16}
        assert rule("model.layers.0.mlp.experts.3.down_proj") == "base"
        assert rule("model.layers.0.mlp.gate") == "float"


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_transformers_loads_a_mixed_checkpoint(tiny_ckpt, tmp_path, family, caplog):
    """compressed-tensors config groups by name: stock transformers (through compressed-tensors' own matching)
    gives every linear the scheme our reader gives it, warns about no target, and computes what our
    dequantized twin computes."""
    from compressed_tensors.quantization import QuantizationConfig
    from test_export_interop import check_loads_and_matches_dequantized

    from moecompress.pipeline import quantize

    src = tiny_ckpt(family)
    out = tmp_path / "q"
    quantize(src, out, quick_config(method="rtn", overrides=["self_attn|shared_expert=8"]))
    model = check_loads_and_matches_dequantized(src, out, tmp_path, f"{family} with int8 attention")
    assert "Could not match" not in caplog.text
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(qcfg).config_groups
    assert [g.weights.num_bits for g in groups.values()] == [8, 4]  # the override group first
    assert not any("experts" in t for g in list(groups.values())[:-1] for t in g.targets)
    f, schemes, mods = quantized_modules(CheckpointReader.open(out))
    assert isinstance(schemes, Schemes) and schemes.mixed
    seen = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is not None and name in mods:
            seen[name] = scheme.weights.num_bits
            assert scheme.weights.num_bits == schemes.of(name).bits, name
    assert {b for n, b in seen.items() if "self_attn" in n} == {8}
    assert {b for n, b in seen.items() if "shared_expert" in n} == {8}


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_an_override_can_give_a_quantized_lm_head_its_own_scheme(tiny_ckpt, tmp_path, fmt):
    """``--quantize-lm-head --override lm_head=8``: the head is stored at 8 bits beside int4 layers, named by its
    own rule, read back at 8 bits, and (compressed-tensors) loaded so by transformers."""
    from test_export_interop import check_loads_and_matches_dequantized

    from moecompress.pipeline import quantize

    src = tiny_ckpt("qwen3_moe", vocab_size=264)
    out = tmp_path / "q"
    quantize(src, out, quick_config(format=fmt, quantize_lm_head=True, overrides=["lm_head=8"]))
    f, schemes, mods = quantized_modules(CheckpointReader.open(out))
    head = read_quantized(CheckpointReader.open(out), f, schemes, "lm_head")
    assert head.spec.bits == 8 and int(head.qweight.max()) > 15
    assert {schemes.of(m).bits for m in mods if m != "lm_head"} == {4}
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert qcfg["dynamic"]["+:^lm_head$"] == {"bits": 8} and qcfg["lm_head"] is True
    else:
        model = check_loads_and_matches_dequantized(src, out, tmp_path, "an 8-bit lm_head")
        assert model.lm_head.quantization_scheme.weights.num_bits == 8
    with pytest.raises(UserError, match="matches no quantized linear"):  # a float head cannot take a scheme
        quantize(src, tmp_path / "q2", quick_config(format=fmt, overrides=["lm_head=8"]))


def test_ct_reader_follows_compressed_tensors_precedence():
    """exact name, then regexes (in compressed-tensors' sorted order), then the class target."""
    w = lambda bits: {"num_bits": bits, "type": "int", "symmetric": True, "group_size": 32,  # noqa: E731
                      "strategy": "group", "dynamic": False}
    qcfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "a": {"targets": ["Linear"], "weights": w(4)},
        "b": {"targets": ["re:.*self_attn.*"], "weights": w(8)},
        "c": {"targets": ["model.layers.0.self_attn.q_proj", "re:.*layers.1.self_attn.*"], "weights": w(2)}}}
    from compressed_tensors.utils.match import match_targets

    _, s = schemes_from_config(qcfg)
    bits_of = {t: g["weights"]["num_bits"] for g in qcfg["config_groups"].values() for t in g["targets"]}
    expected = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.k_proj": 8,
                "model.layers.1.self_attn.k_proj": 2,  # ".*layers.1..." sorts before ".*self_attn.*"
                "model.layers.0.mlp.experts.0.up_proj": 4}
    for name, bits in expected.items():
        assert s.of(name).bits == bits, name
        # compressed-tensors' own choice: the first of its ordered matches
        assert bits_of[match_targets(name, torch.nn.Linear(1, 1), list(bits_of))[0]] == bits, name
    qcfg["config_groups"]["d"] = {"targets": ["Linear"], "weights": w(8)}
    with pytest.raises(UserError, match="same class target"):
        schemes_from_config(qcfg)


def test_gptq_reader_applies_dynamic_rules_in_order():
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "dynamic": {
        "-:.*mlp\\.gate$": {}, "+:.*layers\\.0\\..*": {"bits": 8, "group_size": -1}, ".*self_attn.*": {"bits": 8}}}
    _, s = schemes_from_config(qcfg)
    assert s.of("model.layers.0.mlp.experts.1.up_proj") == QuantSpec(8, None, True, None, (1.0,))
    assert s.of("model.layers.3.self_attn.q_proj") == QuantSpec(8, 128, True, None, (1.0,))
    assert s.of("model.layers.3.mlp.experts.1.up_proj") == s.base == QuantSpec(4, 128, True, None, (1.0,))


def test_awq_with_overrides_searches_each_reader_at_its_scheme(tiny_ckpt, tmp_path):
    """AWQ's shared post-attention scales are scored with the int8 shared expert beside the int4 experts; the
    checkpoint holds both schemes and our runtime reads it as transformers reads the dequantized twin."""
    from test_export_interop import check_loads_and_matches_dequantized

    from moecompress.pipeline import quantize

    src = tiny_ckpt("qwen2_moe")
    summary = quantize(src, tmp_path / "q", quick_config(method="awq", overrides=["shared_expert=8"]))
    assert any(rec.get("readers") and any("shared_expert" in r for r in rec["readers"])
               for layer in summary["layers"] for rec in layer.get("awq", []))
    check_loads_and_matches_dequantized(src, tmp_path / "q", tmp_path, "awq with an int8 shared expert")


def test_plan_counts_each_linear_at_its_own_scheme(tiny_ckpt, tmp_path):
    from moecompress.pipeline import quantize
    from moecompress.runtime.plan import model_parts

    src = tiny_ckpt("qwen3_moe")
    sizes = {}
    for name, extra in (("w4", {}), ("mixed", {"overrides": ["self_attn=8"]})):
        quantize(src, tmp_path / name, quick_config(method="rtn", **extra))
        parts = model_parts(tmp_path / name)
        sizes[name] = {p.name: p.nbytes for p in parts.dense}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert sizes["mixed"][q] > 1.6 * sizes["w4"][q]  # codes twice the bytes, the same scales
    mlp = [n for n in sizes["w4"] if ".mlp." in n and "gate.weight" not in n]
    assert all(sizes["mixed"][n] == sizes["w4"][n] for n in mlp)


def test_inspect_lists_the_other_schemes(tiny_ckpt, tmp_path):
    from moecompress.inspect import describe, render
    from moecompress.pipeline import quantize

    quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q", quick_config(method="rtn", overrides=["self_attn=8/16"]))
    d = describe(tmp_path / "q")
    assert d["quantization"]["other_schemes"] == [
        {"bits": 8, "group_size": 16, "modules": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                   "self_attn.v_proj"]}]
    assert "other scheme  int8, group 16: self_attn.k_proj" in render(d)
    json.dumps(d)  # --json


@pytest.mark.parametrize("args,message", [
    (["--override", "experts=8"], "routed experts"),
    (["--override", "self_attn"], "expected REGEX=BITS"),
    (["--override", r"self_attn\.q_proj=8"], "fused layer"),
    (["--override", "no_such_module=8"], "matches no quantized linear"),
    (["--override", "self_attn=8", "--format", "awq"], "AWQ format has one bit width"),
    (["--override", "self_attn=8/48"], "power of two"),
])
def test_bad_overrides_are_one_line(tiny_ckpt, tmp_path, capsys, args, message):
    rc, err = run_cli(capsys, "quantize", tiny_ckpt("qwen3_moe"), "--out", tmp_path / "q", "--method", "rtn",
                      "--group-size", "32", *args)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "q").exists()
