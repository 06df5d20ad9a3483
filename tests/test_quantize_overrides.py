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
    from moecompress.settings import build_config

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


def _vllm_scheme_bits(qcfg: dict, layer_name: str, class_name: str) -> int:
    """vLLM's compressed-tensors lookup before July 2026: the layer's name against every target (exact or ``re:``,
    re.match), then the class name containing a class target; a fused layer's parts only after that."""
    groups = list(qcfg["config_groups"].values())
    for g in groups:
        for t in g["targets"]:
            if t == layer_name or (t.startswith("re:") and re.match(t[3:], layer_name)):
                return g["weights"]["num_bits"]
    for g in groups:
        if any(not t.startswith("re:") and t in class_name for t in g["targets"]):
            return g["weights"]["num_bits"]
    raise AssertionError(f"no target for {layer_name}")


@pytest.mark.parametrize("family,fused", [("qwen2_moe", ["self_attn.qkv_proj", "mlp.shared_expert.gate_up_proj"]),
                                          ("deepseek_v3", ["self_attn.fused_qkv_a_proj"])])
def test_fused_layers_of_serving_engines_get_the_override(tiny_ckpt, tmp_path, family, fused):
    """vLLM's fused layers (qkv_proj, gate_up_proj, fused_qkv_a_proj) find the override group by their own name
    in the compressed-tensors output, even in vLLM's older lookup order (else "Linear" in QKVParallelLinear would
    give them the base scheme), and GPTQ's dynamic rules name them too."""
    from moecompress.pipeline import quantize

    src = tiny_ckpt(family)
    for fmt in ("compressed-tensors", "gptq"):
        out = tmp_path / fmt
        quantize(src, out, quick_config(method="rtn", format=fmt, overrides=["self_attn|shared_expert=8"]))
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        for local in fused:
            name = f"model.layers.1.{local}"
            if fmt == "compressed-tensors":
                assert _vllm_scheme_bits(qcfg, name, "MergedColumnParallelLinear") == 8, name
                assert _vllm_scheme_bits(qcfg, "model.layers.1.mlp.experts.0.gate_proj", "Linear") == 4
            else:
                rule = next(v for k, v in qcfg["dynamic"].items() if re.match(k.removeprefix("+:").removeprefix("-:"), name))
                assert rule.get("bits") == 8, name


def test_a_lone_member_of_a_fused_group_gets_no_fused_name(tiny_ckpt, tmp_path):
    """DeepSeek-V2-Lite has q_proj without k_proj/v_proj (and kv_a_proj_with_mqa without q_a_proj): vLLM fuses
    neither, so no qkv_proj / fused_qkv_a_proj name appears in either format's rules."""
    from moecompress.pipeline import quantize

    for fmt in ("compressed-tensors", "gptq"):
        out = tmp_path / fmt
        quantize(tiny_ckpt("deepseek_v2"), out, quick_config(method="rtn", format=fmt, overrides=["self_attn=8"]))
        text = (out / "config.json").read_text()
        assert "q_proj" in text and "qkv_proj" not in text and "fused_qkv_a_proj" not in text, fmt


def test_kept_fused_groups_get_a_negative_rule_under_their_fused_name(tiny_ckpt, tmp_path):
    """GPTQ format: an ignored q/k/v (or Qwen3.5's float in_proj_b/a) is matched as vLLM's qkv_proj (in_proj_ba)
    by a negative rule, before the positive rule that gives the other layers' attention 8 bits."""
    from moecompress.pipeline import quantize

    out = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), out, quick_config(method="rtn", format="gptq", ignore=[r"layers\.0\.self_attn"],
                                                       overrides=["self_attn=8"]))
    dyn = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]

    def first(name):
        return next((k[:2], v) for k, v in dyn.items() if re.match(k.removeprefix("+:").removeprefix("-:"), name))

    assert first("model.layers.0.self_attn.qkv_proj") == ("-:", {})
    assert first("model.layers.1.self_attn.qkv_proj") == ("+:", {"bits": 8})
    out2 = tmp_path / "q35"
    quantize(tiny_ckpt("qwen3_5_moe"), out2, quick_config(method="rtn", format="gptq"))
    dyn = json.loads((out2 / "config.json").read_text())["quantization_config"]["dynamic"]
    assert first("model.language_model.layers.0.linear_attn.in_proj_ba") == ("-:", {})


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "qwen3_5_moe", "glm4_moe_lite", "mixtral", "qwen3_next",
                                    "deepseek_v2"])
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
    ours = {m.partition(".layers.")[2]: schemes.of(m).bits for m in mods}  # Qwen3.5: language_model on disk only
    seen = {}
    for name, mod in model.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        tail = name.partition(".layers.")[2]
        if scheme is not None and tail in ours:
            seen[tail] = scheme.weights.num_bits
            assert scheme.weights.num_bits == ours[tail], name
    assert {b for n, b in seen.items() if "self_attn" in n} == {8}
    assert {b for n, b in seen.items() if "shared_expert" in n} <= {8}
    assert {b for n, b in seen.items() if "self_attn" not in n and "shared_expert" not in n} <= {4}


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
    with pytest.raises(UserError, match="lm_head stays in float unless --quantize-lm-head"):  # a float head
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


def test_awq_losses_take_one_scheme_per_reader(gen):
    from moecompress.quant.awq import hessian_loss, weight_mean
    from moecompress.quant.balance import AwqSettings, Reader

    s4, s8 = QuantSpec(4, 32), QuantSpec(8, 16)
    settings = AwqSettings(s4, spec_of=lambda name: s8 if "shared" in name else None)
    readers = [Reader("mlp.shared_expert.gate_proj", "linear"), Reader("mlp.experts.gate_up_proj", "experts_gate_up")]
    assert settings.reader_specs(readers) == [s8, s4]
    ws = [torch.randn(1, 48, 64, generator=gen) for _ in range(2)]
    x = torch.randn(256, 64, generator=gen)
    hs = [(2 / 256 * x.T @ x)[None]] * 2
    s = torch.rand(1, 64, generator=gen) + 0.5
    mixed = hessian_loss(ws, hs, s, [s8, s4])
    assert torch.allclose(mixed, hessian_loss(ws[:1], hs[:1], s, s8) + hessian_loss(ws[1:], hs[1:], s, s4))
    assert mixed < 0.6 * hessian_loss(ws, hs, s, s4)  # the int8 reader adds almost nothing: about half
    assert not torch.equal(weight_mean(ws, [s8, s4]), weight_mean(ws, s4))  # groups of 16 vs 32


def test_awq_with_overrides_searches_each_reader_at_its_scheme(tiny_ckpt, tmp_path):
    """AWQ's shared post-attention scales are scored with the int8 shared expert beside the int4 experts (the
    group's loss before any scaling drops against the all-int4 run); the checkpoint holds both schemes and
    transformers reads it as our dequantized twin."""
    from test_export_interop import check_loads_and_matches_dequantized

    from moecompress.pipeline import quantize

    src = tiny_ckpt("qwen2_moe")
    before = {}
    for name, extra in (("w4", {}), ("q", {"overrides": ["shared_expert=8"]})):
        summary = quantize(src, tmp_path / name, quick_config(method="awq", **extra))
        before[name] = [rec["loss_before"] for layer in summary["layers"] for rec in layer.get("awq", [])
                        if any("shared_expert" in r for r in rec.get("readers", [])) and "loss_before" in rec]
    assert before["q"] and len(before["q"]) == len(before["w4"])
    assert all(a < b for a, b in zip(before["q"], before["w4"])), before
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


def test_stacked_solves_split_by_scheme():
    from moecompress.layer_quantize import _split_by_scheme

    a, b, c = (Target(f"linear_attn.in_proj_{x}", "attn") for x in ("qkv", "z", "b"))
    got = _split_by_scheme([[a, b, c]], 0, {"layers.0.linear_attn.in_proj_qkv": QuantSpec(8, 32),
                                            "layers.0.linear_attn.in_proj_z": QuantSpec(8, 32)})
    assert got == [[a, b], [c]]


def test_inspect_lists_the_other_schemes(tiny_ckpt, tmp_path):
    from moecompress.inspect import describe, render
    from moecompress.pipeline import quantize

    # a float model: the estimate of int4 with int8 attention lies between int4's and int8's, and near what
    # quantize --override self_attn=8 then writes
    src = describe(tiny_ckpt("qwen3_moe"), group_size=32)["size_estimate_bytes"]
    assert src["int4"] < src["int4_attn8"] < src["int8"]
    quantize(tiny_ckpt("qwen3_moe"), tmp_path / "e", quick_config(method="rtn", overrides=["self_attn=8"]))
    on_disk = sum(f.stat().st_size for f in (tmp_path / "e").glob("*.safetensors"))
    assert on_disk == pytest.approx(src["int4_attn8"], rel=0.1)

    quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q", quick_config(method="rtn", overrides=["self_attn=8/16"]))
    d = describe(tmp_path / "q")
    assert d["quantization"]["other_schemes"] == [
        {"bits": 8, "group_size": 16, "modules": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                   "self_attn.v_proj"], "layers": [0, 1]}]
    assert "other scheme  int8, group 16: self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, self_attn.v_proj\n" \
        in render(d) + "\n"
    json.dumps(d)  # --json
    quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q1", quick_config(method="rtn", overrides=[r"layers\.1\.self_attn=8"]))
    assert "self_attn.v_proj (layer 1 only)" in render(describe(tmp_path / "q1"))


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
