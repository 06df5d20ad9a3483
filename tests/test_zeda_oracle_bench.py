"""benchmarks/zeda_oracle_bound.py: its slot rules on hand-made tokens, and a smoke run on a tiny model (whose
replaced MoE blocks must give the original's logits before any rule drops a slot)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    from conftest import benchmark_module

    with benchmark_module("zeda_oracle_bound") as mod:
        yield mod


def test_rules_by_hand(bench):
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert bench.top_p(0.8)(w, None).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    assert bench.top_p(0.81)(w, None).tolist() == [[True, True, True, False]]
    assert bench.threshold(0.3)(w, None).tolist() == [[True, True, True, False]]  # >= 0.15
    # outputs: slot 2 cancels slot 3; slot 1 is small
    y = torch.tensor([[[4.0, 0.0], [0.0, 0.5], [1.0, 1.0], [-1.0, -1.0]]])
    assert bench.oracle(0.2)(w, y).tolist() == [[True, False, True, True]]  # norms 4, .5, 1.41, 1.41
    # |total| = |(4, 0.5)| = 4.03; dropped in ascending norm: slot 1 (error 0.5), then slot 2 (error |(1, 1.5)| = 1.80)
    assert bench.oracle_error(0.3)(w, y).tolist() == [[True, False, True, True]]  # 1.80 > 0.3 x 4.03: stop
    # a larger budget takes slot 2, then slot 3 (its cancelling twin: the error falls back to 0.5), never slot 0
    assert bench.oracle_error(0.5)(w, y).tolist() == [[True, False, False, False]]


def test_smoke_on_a_tiny_model(bench, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert bench.main(["--model", str(tiny_ckpt("qwen3_moe")), "--samples", "2", "--seq-len", "32", "--steps", "3",
                       "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"top-p", "threshold", "oracle", "oracle-error"}
    assert all(r["kl"] >= 0 and 0 <= r["skip"] <= 1 for r in rows.values())
    assert "best oracle" in capsys.readouterr().out
