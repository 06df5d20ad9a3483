"""python -m moecompress.kernels.bench on CPU: the torch twins only (no kernels, no interpreter needed)."""

from __future__ import annotations

import json

import pytest
import torch

from moecompress.kernels import _bench_util as bu
from moecompress.kernels.bench import _quantized, main

FAST = ["--device", "cpu", "--warmup", "0", "--iters", "1", "--baseline-iters", "2", "--copy-mb", "4"]
KEYS = {
    "shape", "experts", "top_k", "hidden", "inter", "tokens", "wdtype", "group_size", "symmetric", "mode",
    "experts_hit", "bytes", "flops", "kernel_us", "kernel_timing", "twin_us", "torch_grouped_us",
    "torch_grouped_impl", "time_us", "gbps", "pct_copy_bw", "tflops", "speedup_vs_bf16",
    "speedup_vs_torch_grouped", "rel_err_vs_twin", "torch_grouped_rel_err", "zero_frac", "zero_slots_per_token",
    "time_vs_no_skip",
}


def test_cpu_run_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main([*FAST, "--shapes", "cpu-smoke,8:2:256:128", "--tokens", "1,7", "--dtypes", "int4,bf16,int8",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "CPU SMOKE RUN" in text and "NOT timed" in text
    data = json.loads(out.read_text())
    assert data["meta"]["mode"] == "cpu-twin" and data["meta"]["copy_gbps"] > 0
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 3
    assert [r["wdtype"] for r in rows[:3]] == ["bf16", "int8", "int4"]  # bf16 first, whatever the order given
    shape = bu.SHAPES["cpu-smoke"]
    for r in rows:
        assert set(r) == KEYS
        assert r["mode"] == "cpu-twin" and r["kernel_us"] is None and r["kernel_timing"] is None
        assert r["twin_us"] > 0 and r["torch_grouped_us"] > 0 and r["time_us"] == r["twin_us"]
        assert r["gbps"] > 0 and r["tflops"] > 0 and r["pct_copy_bw"] > 0
        assert r["torch_grouped_rel_err"] < 3e-2  # the bf16 grouped baseline computes the same layer
        _, _, ids = bu.make_inputs(shape, r["tokens"], 0, torch.device("cpu"))
        assert r["experts_hit"] == len(set(ids.flatten().tolist()))
        if r["tokens"] == 1:
            assert r["experts_hit"] == shape.top_k
        assert r["bytes"] == bu.moved_bytes(shape, r["tokens"], r["experts_hit"], r["wdtype"], 128, False)
        assert r["flops"] == 2 * r["tokens"] * 2 * 3 * 256 * 128
        assert r["tflops"] == pytest.approx(r["flops"] / r["time_us"] / 1e6)
        bf16 = next(b for b in rows if (b["shape"], b["tokens"], b["wdtype"]) == (r["shape"], r["tokens"], "bf16"))
        if r["wdtype"] == "bf16":
            assert r["speedup_vs_bf16"] is None
        else:
            assert r["speedup_vs_bf16"] == pytest.approx(bf16["time_us"] / r["time_us"])


def test_moved_bytes_by_hand():
    s = bu.SHAPES["cpu-smoke"]  # H=256, I=128: 3*H*I = 98304 weights per expert; acts 2*7*256*2 = 7168
    assert bu.moved_bytes(s, 7, 5, "bf16", 128, False) == 5 * 98304 * 2 + 7168
    # int4 g128: codes 49152 B; scales 2I*(H/128) + H*(I/128) = 512 + 256 = 768, bf16
    assert bu.moved_bytes(s, 7, 5, "int4", 128, False) == 5 * (49152 + 768 * 2) + 7168 == 260608
    assert bu.moved_bytes(s, 7, 5, "int8", 128, True) == 5 * (98304 + 768 * 3) + 7168  # + uint8 zeros
    assert bu.moved_bytes(s, 7, 5, "int4", 0, False) == 5 * (49152 + (256 + 256) * 2) + 7168  # per-channel


@pytest.mark.parametrize("wdtype,group,asym", [("int4", 128, False), ("int8", 32, True), ("int4", 0, True)])
def test_moved_bytes_match_the_kernel_tensors(wdtype, group, asym):
    s = bu.SHAPES["cpu-smoke"]
    w13, w2 = bu.make_weights(s, torch.device("cpu"), 0)
    total = 0
    for q in _quantized(w13, w2, wdtype, group, asym):
        total += sum(t.nbytes for t in (q.qweight, q.scales, q.zeros) if t is not None)
    assert bu.moved_bytes(s, 0, s.experts, wdtype, group, asym) == total


def test_experts_hit_counts_distinct_real_experts():
    ids = torch.tensor([[0, 1], [1, 0], [7, 9], [-1, 3]], dtype=torch.int32)  # 9 and -1 are not real experts
    assert bu.experts_hit(ids, 8) == 4
    assert bu.experts_hit(torch.zeros(0, 2, dtype=torch.int32), 8) == 0


def test_torch_grouped_matches_twin():
    from moecompress.kernels.fused_moe import fused_moe_torch

    s = bu.Shape("t", 8, 2, 64, 32)
    w13, w2 = bu.make_weights(s, torch.device("cpu"), 1)
    x, w, ids = bu.make_inputs(s, 5, 1, torch.device("cpu"))  # 10 slots over 8 experts: some get none
    ref = fused_moe_torch(x, w13, w2, w, ids)
    for gmm in [False] + ([True] if hasattr(torch, "_grouped_mm") else []):
        assert bu.rel_err(bu.torch_grouped_moe(x, w13, w2, w, ids, gmm), ref) < 3e-2


@pytest.mark.parametrize("argv,needle", [
    (["--shapes", "nope"], "unknown shape"),
    (["--shapes", "8:9:256:128"], "top-k"),
    (["--tokens", "0"], "positive"),
    (["--tokens=1,-3"], "positive"),
    (["--tokens", "x"], "positive"),
    (["--dtypes", "fp8"], "unknown weight dtype"),
    (["--group-size", "48"], "power of two"),
    (["--iters", "0"], "out of range"),
    (["--bogus"], "unrecognized"),
])
def test_bad_args_exit_2_with_one_line(capsys, argv, needle):
    assert main(["--device", "cpu", *argv]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert cap.out == ""


def test_zero_frac_rows(tmp_path, capsys):
    """--zero-frac: the lowest-weight slots go to the zero expert (id E); fewer experts hit, fewer bytes,
    the torch baseline drops them too (it still equals the twin), and each row is timed against share 0."""
    out = tmp_path / "bench.json"
    rc = main([*FAST, "--shapes", "cpu-smoke", "--tokens", "1,7", "--dtypes", "bf16,int4", "--zero-frac", "0.5,0",
               "--json", str(out)])
    assert rc == 0 and "x skip0" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["zero_frac"] for r in rows] == [0.0] * 4 + [0.5] * 4
    shape = bu.SHAPES["cpu-smoke"]
    for r in rows:
        base = next(b for b in rows if (b["tokens"], b["wdtype"], b["zero_frac"]) == (r["tokens"], r["wdtype"], 0.0))
        assert r["time_vs_no_skip"] == pytest.approx(r["time_us"] / base["time_us"])
        assert r["torch_grouped_rel_err"] < 3e-2
        _, w, ids = bu.make_inputs(shape, r["tokens"], 0, torch.device("cpu"), r["zero_frac"])
        assert int((ids == shape.experts).sum()) == r["tokens"] * r["zero_slots_per_token"]
        assert r["experts_hit"] == len(set(ids[ids < shape.experts].tolist()))
        if r["zero_frac"]:
            assert r["zero_slots_per_token"] == 1 and r["experts_hit"] <= base["experts_hit"]
            assert r["bytes"] < base["bytes"] if r["tokens"] == 1 else r["bytes"] <= base["bytes"]
            _, w0, ids0 = bu.make_inputs(shape, r["tokens"], 0, torch.device("cpu"))
            assert torch.equal(ids[:, 0], ids0[:, 0]) and torch.equal(w, w0)  # the best slot and weights kept
    assert main([*FAST, "--zero-frac", "1.5"]) == 2
