"""`moecompress run`: builds and evaluates every variant, skips what is up to date, redoes what changed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from moecompress.cli import main
from moecompress.run.runner import run_recipe, settings_diff

RECIPE = """
model: {model}
output_dir: {out}
calibration: {{samples: 4, seq_len: 32, batch_size: 4}}
eval: {{data: [builtin:heldout-code], samples: 2, seq_len: 32}}
variants:
  - {{name: rtn, method: rtn, bits: {rtn_bits}, group_size: 32}}
  - {{name: gptq, method: gptq, bits: 4, group_size: 32, min_expert_tokens: 0}}
report: {{title: Tiny run}}
"""


def _decisions(run):
    info = json.loads((run / "run.json").read_text())
    return {(d["variant"], d["step"]): d for d in info["decisions"]}


def _cache_status(run):
    return {n: json.loads((run / "eval" / f"{n}.json").read_text())["reference_cache"]["status"]
            for n in ("reference", "rtn", "gptq")}


def _write(tmp_path, model, out, rtn_bits=4):
    p = tmp_path / "recipe.yaml"
    p.write_text(RECIPE.format(model=model, out=out, rtn_bits=rtn_bits))
    return p


def test_settings_diff():
    assert settings_diff({"bits": 4, "seed": 0}, {"bits": 3, "seed": 0}) == ["bits: 4 -> 3"]
    # a field added since the build counts as unchanged when it has its default value
    assert settings_diff({"bits": 4}, {"bits": 4, "new": False}, {"new": False}) == []
    assert settings_diff({"bits": 4}, {"bits": 4, "new": True}, {"new": False}) == ["new: (unset) -> True"]


def test_same_place():
    from moecompress.run.stamps import same_place

    assert same_place("variants/a", "variants/a") and same_place("/m/q", "/m/q")
    # a stamp from before paths were recorded relative, or from the run folder's old location: still the same place
    assert same_place("/old/run/variants/a", "variants/a") and same_place("/old/run/zeda", "zeda")
    assert not same_place("/old/run/variants/b", "variants/a") and not same_place("/a/q", "/b/q")
    assert not same_place(None, "variants/a") and not same_place("variants/a", "/run/variants/a")


def test_run_skips_up_to_date_and_redoes_changed(tmp_path, tiny_ckpt, capsys):
    model = tiny_ckpt("qwen3_moe")
    run = tmp_path / "run"
    recipe = _write(tmp_path, model, run)

    # 1. everything is new (through the CLI: the summary is printed)
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "Tiny run" in out and "report.html" in out and "gptq" in out
    d = _decisions(run)
    assert {k: v["action"] for k, v in d.items()} == {
        ("rtn", "build"): "built", ("gptq", "build"): "built", ("reference", "eval"): "evaluated",
        ("rtn", "eval"): "evaluated", ("gptq", "eval"): "evaluated"}
    for name in ("rtn", "gptq"):
        saved = json.loads((run / "variants" / name / "moecompress.json").read_text())
        assert saved["recipe"]["method"] == name and saved["recipe"]["calib_samples"] == 4
        ev = json.loads((run / "eval" / f"{name}.json").read_text())
        assert ev["run_stamp"]["settings"]["samples"] == 2 and ev["kl"] > 0
    assert json.loads((run / "eval" / "reference.json").read_text())["kl"] < 1e-6
    # the reference ran once, in its own row; the variants replayed it from the run's cache
    assert _cache_status(run) == {"reference": "written", "rtn": "hit", "gptq": "hit"}
    assert len(list((run / "reference-cache").glob("ref-*.safetensors"))) == 1
    for f in ("report.json", "report.md", "report.html", "plots/accuracy_vs_size.png"):
        assert (run / f).is_file(), f
    mtimes = {n: (run / "variants" / n / "model.safetensors").stat().st_mtime_ns for n in ("rtn", "gptq")}

    # 2. nothing changed: nothing is redone
    run_recipe(recipe)
    d = _decisions(run)
    assert {v["action"] for v in d.values()} == {"skipped"}
    assert all(v["reason"] == "up to date" for v in d.values())
    assert mtimes == {n: (run / "variants" / n / "model.safetensors").stat().st_mtime_ns for n in ("rtn", "gptq")}

    # 2b. a variant built by another build of moecompress: kept (same settings and source), but said so
    meta = run / "variants" / "gptq" / "moecompress.json"
    saved = json.loads(meta.read_text())
    saved["versions"]["moecompress"]["code"] = "0" * 16
    meta.write_text(json.dumps(saved))
    run_recipe(recipe, report=False)
    d = _decisions(run)
    assert d[("gptq", "build")]["action"] == "skipped"
    assert "up to date (built by another build of moecompress" in d[("gptq", "build")]["reason"]
    assert d[("rtn", "build")]["reason"] == "up to date"

    # 3. one variant's settings changed: only it is rebuilt, and re-evaluated because its checkpoint changed
    recipe = _write(tmp_path, model, run, rtn_bits=8)
    run_recipe(recipe, report=False)
    d = _decisions(run)
    assert d[("rtn", "build")]["action"] == "built" and "bits: 4 -> 8" in d[("rtn", "build")]["reason"]
    assert d[("rtn", "eval")]["action"] == "evaluated" and "checkpoint changed" in d[("rtn", "eval")]["reason"]
    assert d[("gptq", "build")]["action"] == "skipped" and d[("gptq", "eval")]["action"] == "skipped"
    assert d[("reference", "eval")]["action"] == "skipped"
    assert _cache_status(run)["rtn"] == "hit"  # the reference's row was not redone: its cache still serves
    assert json.loads((run / "variants" / "rtn" / "moecompress.json").read_text())["recipe"]["bits"] == 8
    assert mtimes["gptq"] == (run / "variants" / "gptq" / "model.safetensors").stat().st_mtime_ns

    # 4. evaluation settings changed: every evaluation is redone, no build is
    text = recipe.read_text().replace("samples: 2, seq_len: 32", "samples: 3, seq_len: 32")
    recipe.write_text(text)
    run_recipe(recipe, report=False)
    d = _decisions(run)
    assert all(d[(n, "build")]["action"] == "skipped" for n in ("rtn", "gptq"))
    assert all(d[(n, "eval")]["action"] == "evaluated" and "samples: 2 -> 3" in d[(n, "eval")]["reason"]
               for n in ("reference", "rtn", "gptq"))
    assert _cache_status(run) == {"reference": "written", "rtn": "hit", "gptq": "hit"}  # new windows, new entry

    # 5. the run folder moved (or copied, times kept): its paths are recorded relative to it, nothing is redone
    moved = shutil.copytree(run, tmp_path / "moved")
    run_recipe(recipe, out=moved, report=False)
    assert {v["action"] for v in _decisions(moved).values()} == {"skipped"}

    # 6. a checkpoint rebuilt, its run stopped before evaluating it: the report leaves the old numbers out, and
    # says so (a recipe without a bench section: no speed from old benchmarks either)
    from moecompress.report import report_data

    (moved / "bench").mkdir()
    (moved / "bench" / "gptq.json").write_text(json.dumps({"decode_tokens_per_s": 1.0}))
    f = moved / "variants" / "rtn" / "model.safetensors"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    data = report_data(moved)
    assert [r["name"] for r in data["variants"]] == ["reference", "gptq"] and not data["has_speed"]
    assert any("the evaluations of rtn measured an earlier build" in w for w in data["warnings"]), data["warnings"]
    assert any("no current evaluation of rtn" in w for w in data["warnings"])
    assert any("no bench section" in w for w in data["warnings"])


def test_edited_inputs_redo_what_read_them_and_the_report_flags_mixed_text(tmp_path, tiny_ckpt, caplog):
    """Calibration and evaluation text named by path: an edit rebuilds the builds that read it and re-evaluates
    every row, so no table compares numbers from different text; evaluations that did read different text
    (copied in by hand) get a warning in the report. A source model rewritten in place rebuilds every variant."""
    from moecompress.report import write_report
    from moecompress.tiny import save_tiny

    model = shutil.copytree(tiny_ckpt("qwen3_moe"), tmp_path / "model")
    run, calib, held = tmp_path / "run", tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)
    held.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, out=run, rtn_bits=4)
                      .replace("{samples: 4,", f"{{data: {calib}, samples: 4,")
                      .replace("builtin:heldout-code", str(held)))
    run_recipe(recipe, report=False)
    for f in (run / "eval").glob("*.json"):  # evaluations of a version without the text stamp: adopted, not redone
        ev = json.loads(f.read_text())
        del ev["run_stamp"]["text_stamp"]
        f.write_text(json.dumps(ev))
    run_recipe(recipe, report=False)
    assert {v["action"] for v in _decisions(run).values()} == {"skipped"}
    assert all("text_stamp" in json.loads(f.read_text())["run_stamp"] for f in (run / "eval").glob("*.json"))
    held.write_text("Pack my box with five dozen liquor jugs.\n" * 200)
    run_recipe(recipe, report=False)
    d = _decisions(run)
    assert all(d[(n, "build")]["action"] == "skipped" for n in ("rtn", "gptq"))
    assert all(d[(n, "eval")]["action"] == "evaluated" and d[(n, "eval")]["reason"] == "evaluation text changed"
               for n in ("reference", "rtn", "gptq"))
    calib.write_text("class A:\n    pass\n" * 300)
    run_recipe(recipe, report=False)
    d = _decisions(run)
    # RTN too: the output errors its moecompress.json records are measured on that text (its weights are not)
    assert all(d[(n, "build")]["action"] == "built" and "calibration text changed" in d[(n, "build")]["reason"]
               for n in ("rtn", "gptq"))
    assert d[("gptq", "eval")]["action"] == "evaluated" and d[("reference", "eval")]["action"] == "skipped"

    ev = json.loads((run / "eval" / "rtn.json").read_text())
    ev["data"]["held"]["text_sha256"] = "f" * 64
    (run / "eval" / "rtn.json").write_text(json.dumps(ev))
    with caplog.at_level("WARNING", logger="moecompress"):
        data = write_report(run, formats=["md"])
    assert len(data["warnings"]) == 1 and data["warnings"][0].startswith("held: the evaluations read different text")
    assert "rtn on ffffffffffff" in data["warnings"][0] and "Warning" in (run / "report.md").read_text()
    assert "do not compare" in caplog.text

    shutil.rmtree(model)
    save_tiny("qwen3_moe", model, seed=3)  # another model in the same folder
    run_recipe(recipe, report=False)
    d = _decisions(run)
    assert all(d[(n, "build")]["action"] == "built" and f"source: the files of {model} changed"
               in d[(n, "build")]["reason"] for n in ("rtn", "gptq"))
    assert all(d[(n, "eval")]["action"] == "evaluated" for n in ("reference", "rtn", "gptq"))


def test_force_out_and_bench(tmp_path, tiny_ckpt, monkeypatch, caplog):
    import moecompress.run.runner as runner

    model = tiny_ckpt("qwen3_moe")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\noutput_dir: {tmp_path / 'unused'}\n"
                      "eval: {data: [builtin:heldout-code], samples: 2, seq_len: 32}\n"
                      "variants: [{name: rtn, method: rtn, bits: 4, group_size: 32}]\n"
                      "bench: {device: cpu, prompt_len: 8, new_tokens: 4}\n")
    # no runtime benchmark installed: the run goes on without speed numbers, and says so
    monkeypatch.setattr(runner, "find_benchmark", lambda: None)
    with caplog.at_level("INFO", logger="moecompress.run"):
        run = run_recipe(recipe, out=tmp_path / "elsewhere", report=False)
    assert run == tmp_path / "elsewhere" and not (tmp_path / "unused").exists()
    assert "bench: skipped" in caplog.text and not (run / "bench").exists()

    calls = []

    def fake_benchmark(model_dir, device, prompt_len, new_tokens, batch, dtype, repeats):
        calls.append((model_dir, device, prompt_len, new_tokens, batch, dtype, repeats))
        fast = "variants" in model_dir
        return {"prefill_tokens_per_s": 900.0 if fast else 500.0, "decode_tokens_per_s": 60.0 if fast else 40.0,
                "device": device, "dtype": "float32", "batch": batch}

    monkeypatch.setattr(runner, "find_benchmark", lambda: fake_benchmark)
    (run / "variants" / "stray").mkdir()  # not in the recipe: noted, left alone
    run_recipe(recipe, out=run, force=True)
    d = _decisions(run)
    assert d[("rtn", "build")]["reason"] == "--force" and d[("reference", "eval")]["reason"] == "--force"
    # the source model ran again (its recorded outputs were not replayed: they may be an older build's)
    assert json.loads((run / "eval" / "reference.json").read_text())["reference_cache"]["status"] == "written"
    assert d[("rtn", "bench")]["action"] == "measured" and len(calls) == 2
    assert calls[0][1:] == ("cpu", 8, 4, 1, "auto", 3)
    assert (run / "variants" / "stray").is_dir()
    md = (run / "report.md").read_text()
    assert "decode tok/s" in md and "| 60.0 |" in md and (run / "plots" / "accuracy_vs_speed.png").is_file()
    run_recipe(recipe, out=run, report=False)  # up to date: not measured again
    assert _decisions(run)[("rtn", "bench")]["action"] == "skipped" and len(calls) == 2



BAD_INPUTS = {  # recipe lines (over a good recipe's), extra `run` arguments, the error
    "--out is the model": ("", "--out {model}", "lies inside the source model directory"),
    "--out inside the model": ("", "--out {model}/run", "lies inside the source model directory"),
    "output_dir is the model": ("output_dir: {model}", "", "output_dir {model} lies inside the source model"),
    "--out holds the model": ("", "--out {tmp}", "contains the source model directory"),
    "not a MoE": ("model: {tmp}/dense", "", "'llama' is not a Mixture-of-Experts model"),
    "calibration data missing": ("calibration: {{data: {tmp}/nope.txt}}", "",
                                 "variant a: calibration text path does not exist"),
    "defaults device": ("defaults: {{device: tpu}}", "", "variant a: unknown device 'tpu' (use cpu or cuda[:N])"),
    "eval device": ("eval: {{device: tpu}}", "", "eval: unknown device 'tpu' (use cpu or cuda[:N])"),
    "eval data missing": ("eval: {{data: [{tmp}/nope.txt]}}", "", "eval data path does not exist: {tmp}/nope.txt"),
    "--cache a file": ("model: builtin:demo-quick", "--cache {tmp}/recipe.yaml", "is not a folder"),
    "windows beyond the context": ("calibration: {{seq_len: 4096}}", "",
                                   "variant a: seq_len 4096 is longer than the model's context"),
    "eval windows beyond the context": ("eval: {{seq_len: 4096}}", "", "eval: seq_len 4096 is longer"),
    "a quantized model to quantize": ("model: {tmp}/quantized", "", "is already quantized (compressed-tensors)"),
    "bench device": ("bench: {{device: tpu}}", "", "bench: unknown device 'tpu' (use cpu or cuda[:N])"),
    "bench dtype": ("bench: {{device: cpu, dtype: float64}}", "", "bench.dtype: Input should be 'auto'"),
    # a variant's group size that does not divide a linear: found before the variants ahead of it are built
    "group size": ("variants: [{{name: a, method: rtn, bits: 4, group_size: 32}}, {{name: b, method: gptq, bits: 4}}]",
                   "", "variant b: group size 128 does not divide the input dimension 64 of layer 0"),
    "unknown eval task": ("eval: {{tasks: [no_such_task_xyz]}}", "", "eval: unknown lm-eval task(s) no_such_task_xyz"),
    "skip windows beyond the context": (
        "variants: [{{name: s, skip: {{rule: top-p, target: 0.5, seq_len: 4096}}}}]", "",
        "variant s: seq_len 4096 is longer than the model's context"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_before_anything_is_written(tmp_path, tiny_ckpt, capsys, case):
    """Each mistake is one line, found before the run folder (or anything in the model) is written,
    not when its step comes (the eval's only after every variant was built)."""
    if case == "unknown eval task":
        pytest.importorskip("lm_eval")  # (without it the same check says to install it)
    model = shutil.copytree(tiny_ckpt("qwen3_moe"), tmp_path / "model")
    dense = shutil.copytree(model, tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    config = {k: v for k, v in config.items() if "experts" not in k}  # a dense model's config
    (dense / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    quantized = shutil.copytree(model, tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (quantized / "config.json").write_text(json.dumps(config))
    before = sorted(p.name for p in model.iterdir())
    capsys.readouterr()  # the tiny model's build
    lines, args, expected = (x.format(model=model, tmp=tmp_path) for x in BAD_INPUTS[case])
    keys = {"model": str(model), "output_dir": str(tmp_path / "run"),
            "variants": "[{name: a, method: gptq, bits: 4, group_size: 32}]"}
    keys.update(line.split(": ", 1) for line in lines.splitlines())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    assert main(["run", str(recipe), *args.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("run.json"))
    assert sorted(p.name for p in model.iterdir()) == before
