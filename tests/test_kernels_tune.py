"""The tile-config tuner: on CPU (interpreter) it runs its two-candidate self-test grid, keeps the
fastest config per launcher key, and merges it into a config file without touching other devices."""

from __future__ import annotations

import json

import pytest

from moecompress.kernels import _bench_util as bu
from moecompress.kernels import _common
from moecompress.kernels.tune import FIELDS, candidates, main, tune, write_configs


def test_candidate_grid_fits_the_rows_an_expert_gets():
    decode = candidates(1, 8, 128, quick=False)
    prefill = candidates(4096, 8, 128, quick=False)
    assert max(c["BLOCK_M"] for c in decode) <= 32 < max(c["BLOCK_M"] for c in prefill)
    assert all(c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["BLOCK_K"] >= 16 for c in decode + prefill)
    assert len(prefill) > len(decode) > 10
    # decode also tries split-K (fused_moe's SPLIT_K); prefill has rows enough
    assert {c.get("SPLIT_K", 1) for c in decode} == {1, 2, 4} and {c.get("SPLIT_K", 1) for c in prefill} == {1}


def test_write_configs_merges_under_the_device(tmp_path):
    path = tmp_path / "fused_moe.json"
    path.write_text(json.dumps({"default": {"default": {"BLOCK_M": 64}}, "GPU X": {"int4:t1": {"BLOCK_M": 32}}}))
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    table = write_configs({"int4:t16": {"config": cfg, "us": 1.0}}, "GPU X", path)
    assert table == json.loads(path.read_text())
    assert table["default"] == {"default": {"BLOCK_M": 64}}
    assert table["GPU X"] == {"int4:t1": {"BLOCK_M": 32}, "int4:t16": {k: cfg[k] for k in FIELDS}}
    table = write_configs({"int4:t1": {"config": dict(cfg, SPLIT_K=4), "us": 1.0}}, "GPU X", path)
    assert table["GPU X"]["int4:t1"] == dict(cfg, SPLIT_K=4)  # kept only where it splits


@pytest.mark.skipif(not _common.interpreting(), reason="the CPU self-test runs under TRITON_INTERPRET=1")
def test_tune_picks_the_fastest_config_that_ran_everywhere(tmp_path):
    shapes = bu.parse_shapes("cpu-smoke")

    def timer(fn, warmup, iters):  # runs the kernel once, reports a made-up time: wider BLOCK_N is faster
        fn()
        return 1000.0 / fn.config["BLOCK_N"]

    tuned = tune(shapes, [1, 7], ["int4"], device=__import__("torch").device("cpu"), quick=True,
                 warmup=0, iters=1, log=lambda *_: None, timer=timer)
    assert set(tuned) == {"int4:t1", "int4:t16"}  # 7 tokens fall in the 16-token bucket
    widest = max(candidates(1, 2, 8, quick=True), key=lambda c: c["BLOCK_N"])
    for key, res in tuned.items():
        assert res["config"] == widest, (key, res)
        assert res["us"] == 1000.0 / widest["BLOCK_N"] and len(res["per_shape"]) == 1
    out = tmp_path / "cfg.json"
    assert main(["--tokens", "1", "--config-file", str(out)]) == 0
    assert set(json.loads(out.read_text())["cpu"]) == {"int4:t1"}
