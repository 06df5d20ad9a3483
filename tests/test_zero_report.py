"""Skipping baselines as recipe variants: built, evaluated and reported with skip/active/FLOPs columns and a plot."""

from __future__ import annotations

import json

import pytest
import yaml

from moecompress.errors import UserError
from moecompress.run.recipe import parse_recipe


def test_skip_variant_is_validated():
    base = {"model": "x", "variants": [{"name": "a", "skip": {"rule": "threshold", "target": 0.5}}]}
    assert parse_recipe(base).built_variants()[0].config.rule == "threshold"
    with pytest.raises(UserError, match="target"):
        parse_recipe({**base, "variants": [{"name": "a", "skip": {"rule": "top-p", "target": 1.5}}]})
    with pytest.raises(UserError, match="unknown key 'beta'"):
        parse_recipe({**base, "variants": [{"name": "a", "skip": {"rule": "top-p", "target": 0.5, "beta": 1}}]})
    with pytest.raises(UserError, match="takes only 'name' and 'skip"):
        parse_recipe({**base, "variants": [{"name": "a", "bits": 4, "skip": {"rule": "top-p", "target": 0.5}}]})


@pytest.mark.slow
def test_run_reports_skipping_baselines(tiny_ckpt, tmp_path):
    from moecompress.report import write_report
    from moecompress.run.runner import run_recipe

    recipe = {"model": str(tiny_ckpt("qwen3_moe")), "output_dir": str(tmp_path / "run"),
              "calibration": {"samples": 2, "seq_len": 32}, "eval": {"samples": 2, "seq_len": 32,
                                                                      "data": ["builtin:heldout-code"]},
              "variants": [{"name": "thr-25", "skip": {"rule": "threshold", "target": 0.25, "samples": 4, "seq_len": 64}},
                           {"name": "topk-50", "skip": {"rule": "top-k", "target": 0.5, "samples": 2, "seq_len": 32}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = run_recipe(path, report=False)
    data = write_report(run_dir)
    rows = {r["name"]: r for r in data["variants"]}
    assert rows["topk-50"]["skip_rate"] == 0.5 and rows["topk-50"]["expert_flops"] == 0.5
    assert rows["topk-50"]["method"] == "skip top-k" and rows["reference"]["expert_flops"] == 1.0
    assert 0.05 < rows["thr-25"]["skip_rate"] < 0.45
    assert "Accuracy vs expert FLOPs" in data["plots"]
    md = (run_dir / "report.md").read_text()
    assert "| skip rate | active experts | expert FLOPs |" in md
    # up to date: a second run rebuilds nothing (the calibration's sample count and batch are not what a
    # baseline reads: its own samples and seq_len, the calibration's text and seed)
    recipe["calibration"].update(samples=3, batch_size=2)
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, report=False)
    info = json.loads((run_dir / "run.json").read_text())
    assert {d["action"] for d in info["decisions"] if d["step"] == "build"} == {"skipped"}
    saved = json.loads((run_dir / "variants" / "thr-25" / "moecompress.json").read_text())
    assert saved["recipe"]["calibration"] == {"data": "builtin:stdlib", "seed": 0}  # what a change of rebuilds
