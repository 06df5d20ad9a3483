"""`moecompress demo --quick` end to end: finds the quick demo model in --cache, quantizes, evaluates, reports."""

from __future__ import annotations

import json

import pytest

from moecompress.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys, quick_demo_cache):
    # the quick model is trained once per session (test_demo_model checks that build); the demo finds it
    # in --cache and builds nothing
    run, cache = tmp_path / "demo", quick_demo_cache
    before = sorted(p.name for p in cache.iterdir())
    assert main(["demo", "--quick", "--out", str(run), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"report: {run / 'report.html'}" in out and "demo took" in out
    assert "verdict W3 g64" in out and "GPTQ beats RTN by more than the seed spread: " in out
    assert sorted(p.name for p in cache.iterdir()) == before  # the model in --cache was used, nothing added

    report = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["reference", "rtn-w3g64", "gptq-w3g64-seed0", "gptq-w3g64-seed1", "awq-w3g64", "zeda"]
    assert rows["zeda"]["method"] == "zeda" and rows["zeda"]["skip_rate"] > 0.05 and rows["zeda"]["expert_flops"] < 1
    assert rows["reference"]["kl"] < 1e-6 and rows["reference"]["top1"] == pytest.approx(1.0)
    for name in ("rtn-w3g64", "gptq-w3g64-seed0", "gptq-w3g64-seed1", "awq-w3g64"):
        r = rows[name]
        assert r["bits"] == 3 and r["group_size"] == 64
        assert 0 < r["kl"] < 1 and 0.3 < r["top1"] < 1 and 0 < r["topk_exact"] <= 1
        assert r["size_bytes"] < 0.6 * rows["reference"]["size_bytes"]
    # the model is trained: quantization costs measurable perplexity, and GPTQ's KL is below RTN's
    assert rows["rtn-w3g64"]["ppl_delta_pct"]["heldout-code"] > 0.5
    assert max(rows[n]["kl"] for n in ("gptq-w3g64-seed0", "gptq-w3g64-seed1")) < rows["rtn-w3g64"]["kl"]
    (verdict,) = report["verdicts"]
    assert isinstance(verdict["sensitive"], bool) and isinstance(verdict["gptq_beats_rtn_beyond_seed_spread"], bool)
    assert verdict["gptq_runs"] == 2

    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert {p.name for p in (run / "plots").glob("*.png")} == {"accuracy_vs_size.png", "routing_per_layer.png",
                                                               "expert_load.png", "accuracy_vs_expert_flops.png"}

    # a second demo reuses the model and every variant
    assert main(["demo", "--quick", "--out", str(run), "--cache", str(cache)]) == 0
    decisions = json.loads((run / "run.json").read_text())["decisions"]
    assert decisions and {d["action"] for d in decisions} == {"skipped"}


def test_bad_out_or_cache_fails_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    import moecompress.demo_model as demo_model

    def build(*a, **kw):
        raise AssertionError("the demo model was built before the arguments were checked")

    monkeypatch.setattr(demo_model, "build_demo_model", build)
    a_file, run, cache = tmp_path / "a_file.txt", tmp_path / "run", tmp_path / "cache"
    a_file.write_text("not a folder\n")
    assert main(["demo", "--quick", "--out", str(a_file), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run folder {a_file} exists and is not a folder" in err[0], err
    assert main(["demo", "--quick", "--out", str(run), "--cache", str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --cache {a_file} is not a folder"]
    assert not run.exists() and not cache.exists()
