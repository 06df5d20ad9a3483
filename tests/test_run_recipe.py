"""Recipe files: valid ones parse into full settings; every mistake is one line naming the key, exit 2."""

from __future__ import annotations

import pytest

from moecompress.cli import main
from moecompress.errors import UserError
from moecompress.run.demo import demo_recipe, recipe_text
from moecompress.run.recipe import load_recipe

GOOD = """
model: some/checkpoint
output_dir: runs/x
calibration: {data: builtin:stdlib, samples: 16, seq_len: 64, seed: 5}
defaults: {only_experts: true}
eval: {data: [builtin:heldout-code], samples: 4, seq_len: 64}
variants:
  - {name: rtn-w4, method: rtn, bits: 4, group_size: 32}
  - {name: gptq-w3, method: gptq, bits: 3, group_size: 64, act_order: weight, seed: 1}
report: {title: T, formats: [md]}
"""


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_recipe_merges_calibration_defaults_and_variant(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    rtn, gptq = r.built_variants()
    assert (rtn.name, rtn.config.method, rtn.config.bits, rtn.config.group_size) == ("rtn-w4", "rtn", 4, 32)
    assert rtn.config.seed == 5 and rtn.config.calib_samples == 16 and rtn.config.seq_len == 64
    assert gptq.config.seed == 1 and gptq.config.act_order == "weight"  # the variant wins over calibration
    assert rtn.config.only_experts and gptq.config.only_experts  # defaults apply to every variant
    assert r.eval.data == ["builtin:heldout-code"] and r.report.formats == ["md"]


def test_shipped_demo_recipes_are_valid():
    full, quick = demo_recipe(False), demo_recipe(True)
    assert full.model == "builtin:demo" and quick.model == "builtin:demo-quick"
    names = [v.name for v in full.built_variants()]
    assert {"rtn-w4g128", "gptq-w4g128", "rtn-w3g64"} <= set(names)
    quantized = [v for v in full.built_variants() if hasattr(v.config, "method")]
    w3 = [v.config for v in quantized if v.config.method == "gptq" and v.config.bits == 3]
    # plain GPTQ at three calibration seeds (the report's seed verdict), and GPTQ with block-output tuning
    assert sorted(c.seed for c in w3 if not c.overrides and not c.tune_steps) == [0, 1, 2]
    assert [c.tune_steps for c in w3 if c.tune_steps] == [50]
    assert len(quick.built_variants()) < len(full.built_variants())
    assert "builtin:demo" in recipe_text("demo.yaml")
    assert full.zeda_config() is not None and quick.zeda_config().stage1_steps < full.zeda_config().stage1_steps


BAD = {
    "unknown top-level key": ("modle: x\nvariants: [{name: a, method: rtn}]", "unknown key 'modle' at the top level"),
    "unknown key in a variant": ("model: x\nvariants: [{name: a, method: rtn}, {name: b, bitz: 4}]",
                                 "unknown key 'bitz' in variants[1] (b)"),
    "unknown key in a section": ("model: x\neval: {samples: 4, windows: 3}\nvariants: [{name: a}]",
                                 "unknown key 'windows' in eval"),
    "unknown key in defaults": ("model: x\ndefaults: {bogus: 1}\nvariants: [{name: a}]", "unknown key 'bogus' in defaults"),
    "unknown method": ("model: x\nvariants: [{name: a, method: awqq}]", "variants[0] (a).method"),
    "bad type": ("model: x\nvariants: [{name: a, bits: four}]", "variants[0] (a).bits"),
    "bad bits": ("model: x\nvariants: [{name: a, bits: 5}]", "bits=5 is not supported"),
    "bad section type": ("model: x\ncalibration: {samples: many}\nvariants: [{name: a}]", "calibration.samples"),
    "negative samples": ("model: x\neval: {samples: -1}\nvariants: [{name: a}]", "eval.samples"),
    "cross-field rule": ("model: x\nvariants: [{name: a, method: rtn, act_order: weight}]", "act_order applies to GPTQ"),
    "duplicate names": ("model: x\nvariants: [{name: a}, {name: a, bits: 8}]", "duplicate variant name 'a'"),
    "reserved name": ("model: x\nvariants: [{name: reference}]", "'reference' is taken"),
    "reserved name, other case": ("model: x\nvariants: [{name: Reference}]", "'Reference' is taken"),
    "names equal but for case": ("model: x\nvariants: [{name: a}, {name: A}]", "duplicate variant name 'A'"),
    "a number for a name": ("model: x\nvariants: [{name: 1}]", "variants[0]: 'name' is a int (1), not text: quote"),
    "a long name": ("model: x\nvariants: [{name: " + "a" * 101 + "}]", "101 characters long; at most 100"),
    "a key given twice": ("model: x\nvariants: [{name: a, bits: 4, bits: 8}]",
                          "invalid YAML (line 2, column 31): duplicate key 'bits'"),
    "a section given twice": ("model: x\nvariants: [{name: a}]\nvariants: [{name: b}]",
                              "invalid YAML (line 3, column 1): duplicate key 'variants'"),
    "name with a slash": ("model: x\nvariants: [{name: a/b}]", "names a folder"),
    "nameless variant": ("model: x\nvariants: [{bits: 4}]", "variants[0]: every variant needs a 'name'"),
    "variant not a mapping": ("model: x\nvariants: [rtn]", "variants[0]"),
    "no variants": ("model: x\nvariants: []", "variants"),
    "missing model": ("variants: [{name: a}]", "missing key 'model' at the top level"),
    "unknown report format": ("model: x\nvariants: [{name: a}]\nreport: {formats: [pdf]}", "report.formats[0]"),
    "not a mapping": ("- a\n- b\n", "a recipe is a mapping"),
    "empty file": ("", "the recipe is empty"),
    "bad YAML": ("model: x\nvariants: [{name: a\n", "invalid YAML (line"),
    "boolean group size": ("model: x\nvariants: [{name: a, group_size: true}]",
                           "variants[0] (a).group_size: expected a number, got true"),
    "boolean samples": ("model: x\ncalibration: {samples: true}\nvariants: [{name: a}]",
                        "calibration.samples: expected a number, got true"),
    "boolean skip target": ("model: x\nvariants: [{name: a, skip: {rule: top-k, target: false}}]",
                            "variants[0] (a).skip.target: expected a number, got false"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_is_one_line(tmp_path, case):
    text, expected = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert expected in msg, msg
    assert "\n" not in msg and msg.startswith(str(path))


def test_cli_reports_recipe_errors_with_exit_2(tmp_path, capsys):
    path = _write(tmp_path, "model: x\nvariants: [{name: a, method: rtn, grup_size: 32}]")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'grup_size' in variants[0] (a)" in err[0]
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(_write(tmp_path, "model: nowhere\nvariants: [{name: a}]", "m.yaml"))]) == 2
    assert "model nowhere does not exist" in capsys.readouterr().err
    assert main(["run", str(_write(tmp_path, "model: builtin:nope\nvariants: [{name: a}]", "b.yaml"))]) == 2
    assert "unknown built-in model" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_every_shipped_recipe_parses():
    """The recipes people copy (real-model paths included) validate: every key is a known setting."""
    from pathlib import Path

    import yaml

    from moecompress.run.recipe import parse_recipe

    files = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        r = parse_recipe(yaml.safe_load(f.read_text()), str(f))
        assert r.variants, f


def test_tune_reference_original_is_the_recipes_model(tmp_path):
    """``tune_reference: original`` in a recipe variant (e.g. a ZEDA model tuned toward the model it came from)
    becomes the recipe's resolved model folder; other variants keep theirs."""
    from moecompress.run.runner import Runner

    text = GOOD.replace("variants:\n", "zeda: {target_skip: 0.5}\nvariants:\n"
                        "  - {name: zt, from: zeda, method: gptq, tune_steps: 5, tune_reference: original}\n")
    r = load_recipe(_write(tmp_path, text))
    runner = Runner(r, tmp_path / "run", tmp_path / "model")
    by = runner.by_name
    assert by["zt"].config.tune_reference == str(tmp_path / "model") and by["zt"].source == "zeda"
    assert by["rtn-w4"].config.tune_reference is None
