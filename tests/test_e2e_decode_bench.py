"""benchmarks/e2e_decode.py: the bytes model on hand-computed numbers, and a CPU smoke run of main()."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def e2e():
    from conftest import benchmark_module

    with benchmark_module("e2e_decode") as mod:
        yield mod


def test_step_bytes_by_hand(e2e):
    # tiny: H 128, 4 heads / 2 KV heads of 32, experts 8 x I 128, vocab 260; 2 layers
    d = e2e.Dims.of("tiny", 2)
    assert (d.hidden, d.heads, d.kv_heads, d.head_dim, d.inter, d.experts, d.top_k, d.vocab) == \
        (128, 4, 2, 32, 128, 8, 2, 260)
    # fp32, batch 1, 2 experts hit per layer, context 20
    f = e2e.step_bytes(d, e2e.WeightFormat(4), batch=1, experts_hit_per_layer=2, kv_len=20)
    assert f["embed_rows"] == 128 * 4
    assert f["attention"] == 2 * (128 * 128 + 64 * 128 + 64 * 128 + 128 * 128) * 4 == 393216
    assert f["norms"] == 2 * (128 + 128 + 32 + 32) * 4 == 2560
    assert f["final_norm"] == 128 * 4
    assert f["router"] == 2 * 8 * 128 * 4 == 8192
    assert f["experts"] == 2 * 2 * (256 * 128 + 128 * 128) * 4 == 786432
    assert f["kv_cache"] == 2 * 2 * 1 * 64 * 20 * 4 == 20480
    assert f["lm_head"] == 260 * 128 * 4 == 133120
    assert f["total"] == 1345024
    # int4 group 128 with bf16 scales, batch 16, 7.5 experts hit per layer, context 264
    q = e2e.step_bytes(d, e2e.WeightFormat(2, 4, 128, 2), batch=16, experts_hit_per_layer=7.5, kv_len=264)
    lin = lambda n, k: n * k // 2 + n * (k // 128) * 2  # noqa: E731 -- packed nibbles + one scale per group
    assert lin(128, 128) == 8448
    assert q["attention"] == 2 * (2 * lin(128, 128) + 2 * lin(64, 128)) == 2 * (2 * 8448 + 2 * 4224)
    assert q["experts"] == 2 * 7.5 * (lin(256, 128) + lin(128, 128)) == 2 * 7.5 * (16896 + 8448)
    assert q["kv_cache"] == 2 * 2 * 16 * 64 * 264 * 2
    assert q["embed_rows"] == 16 * 128 * 2 and q["lm_head"] == 260 * 128 * 2  # float in both models
    assert q["router"] == f["router"]  # fp32 whatever the weights
    assert q["total"] == sum(v for k, v in q.items() if k != "total")


def test_expected_unique_experts(e2e):
    assert e2e.expected_unique_experts(128, 8, 1) == pytest.approx(8)
    assert e2e.expected_unique_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert 8 < e2e.expected_unique_experts(128, 8, 16) < 128


def test_cpu_smoke_run(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = e2e.main(["--shape", "tiny", "--device", "cpu", "--batches", "1,3", "--prompt-len", "8", "--new-tokens", "4",
                   "--repeats", "1", "--copy-mb", "8", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "CPU SMOKE RUN" in text and "not meaningful" in text
    data = json.loads(out.read_text())
    meta, rows, targets = data["meta"], data["rows"], data["targets"]
    assert meta["smoke"] and meta["layers"] == 2 and meta["copy_gbps"] > 0
    assert [(r["weights"], r["batch"]) for r in rows] == [("bf16", 1), ("bf16", 3), ("int4", 1), ("int4", 3)]
    keys = {"decode_tokens_per_s", "ms_per_step", "bytes_per_step", "achieved_gbps", "pct_of_floor",
            "copy_gbps", "experts_hit_per_layer", "experts_hit_uniform", "kv_len_mean", "floor_ms_per_step"}
    d = e2e.Dims.of("tiny", 2)
    for r in rows:
        assert keys <= r.keys()
        for k in keys:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])
        assert r["run_dtype"] == "float32" and not r["cuda_graph"] and not r["kernels"]
        assert r["ms_per_step"] == pytest.approx(1e3 * r["batch"] / r["decode_tokens_per_s"])
        assert r["pct_of_floor"] == pytest.approx(100 * r["achieved_gbps"] / r["copy_gbps"])
        assert r["kv_len_mean"] == 8 + 4 / 2
        # top-2 of 8: one token hits exactly 2 distinct experts; 3 tokens hit 2..6
        assert r["experts_hit_per_layer"] == 2 if r["batch"] == 1 else 2 <= r["experts_hit_per_layer"] <= 6
        fmt = e2e.WeightFormat(4) if r["weights"] == "bf16" else e2e.WeightFormat(4, 4, 128, 4)
        assert r["weight_format"] == {"float_bytes": fmt.float_bytes, "bits": fmt.bits,
                                      "group_size": fmt.group_size, "scale_bytes": fmt.scale_bytes}
        if r["weights"] == "bf16":  # the floor counts exactly the float tensors the runtime holds
            assert r["held_vs_counted"] == {"attention": 1.0, "expert": 1.0, "router": 1.0}
        else:  # int4 stays packed on the CPU path too (runtime.cpu_packed): 4-bit codes + bf16 scale and zero
            assert r["held_vs_counted"]["expert"] == pytest.approx(1.0, abs=0.05)
        expected = e2e.step_bytes(d, fmt, r["batch"], r["experts_hit_per_layer"], r["kv_len_mean"])
        assert r["bytes_per_step"] == pytest.approx(expected["total"]) and r["bytes_breakdown"] == expected
    b1 = {r["weights"]: r for r in rows if r["batch"] == 1}
    # batch 1, 2 hits, context 10: the fp32 floor as computed by hand above, minus KV for context 10 instead of 20
    assert b1["bf16"]["bytes_per_step"] == 1345024 - 2 * 2 * 64 * 10 * 4
    assert b1["int4"]["speedup_vs_bf16"] == pytest.approx(
        b1["int4"]["decode_tokens_per_s"] / b1["bf16"]["decode_tokens_per_s"])
    assert b1["bf16"]["speedup_vs_bf16"] is None
    assert {t["what"] for t in targets} == {"int4 faster than bf16 at batch 1", "int4 faster than bf16 at batch 3",
                                           "int4 % of floor at batch 1"}
    assert not any(t["meaningful"] for t in targets)
    # the second run reuses the cached checkpoints
    assert meta["timings_s"]["build_s"] > 0 and meta["timings_s"]["quantize_s"] > 0
    rc = e2e.main(["--shape", "tiny", "--device", "cpu", "--batches", "1", "--prompt-len", "4", "--new-tokens", "2",
                   "--repeats", "1", "--copy-mb", "8", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert rc == 0
    again = json.loads(out.read_text())["meta"]["timings_s"]
    assert again["build_s"] == 0 and again["quantize_s"] == 0


def test_int4_floor_counts_what_the_kernel_path_holds(e2e, tmp_path):
    """Packed int4 (the GPU path; the Triton interpreter on CPU): codes + scales as the floor counts them."""
    import torch

    from moecompress.runtime import Runtime

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src, out = tmp_path / "bf16", tmp_path / "int4"
    e2e.build_checkpoint("tiny", 2, src, device, seed=0)
    e2e.quantize_checkpoint(src, out, device, 128)
    d = e2e.Dims.of("tiny", 2)
    for dtype, fmt in (("float32", e2e.WeightFormat(4, 4, 128, 4)), ("bfloat16", e2e.WeightFormat(2, 4, 128, 2))):
        rt = Runtime.load(out, device=device, dtype=dtype, kernels=True, cuda_graph=False)
        assert rt.report.packed_expert_layers == 2 and rt.report.packed_linears == 8 and not rt.report.dequantized
        held, counted = e2e.held_weight_bytes(rt), e2e.layer_weight_bytes(d, fmt)
        assert held == counted, (dtype, held, counted)
        # one token picks top-2 of 8 at every step and layer: exactly 2 distinct experts
        assert e2e.count_experts_hit(rt, torch.randint(0, 260, (1, 5)), 3) == 2
        assert 2 <= e2e.count_experts_hit(rt, torch.randint(0, 260, (3, 5)), 3) <= 6
