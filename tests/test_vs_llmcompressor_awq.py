"""benchmarks/vs_llmcompressor_awq.py: the target judgement and the AWQ record summary, on made-up numbers."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_llmcompressor_awq as bench  # noqa: E402


def _variant(kl, topk=0.9, wall=10.0):
    return {"eval": {"mean_kl": kl, "topk_exact": topk}, "wall_s": wall}


def test_targets_judged_on_the_numbers():
    res = {"ours-rtn": _variant(0.02), "ours-gptq": _variant(0.008), "ours-awq": _variant(0.012, 0.91, 20.0),
           "ours-awq+gptq": _variant(0.0081), "llmc-awq": _variant(0.021, 0.89, 200.0)}
    t = bench.targets(res)
    assert t["ours-awq mean KL <= 0.6 x llmc-awq"]["met"] is True
    assert abs(t["ours-awq mean KL <= 0.6 x llmc-awq"]["ratio"] - 0.012 / 0.021) < 1e-12
    assert t["ours-awq mean KL < ours-rtn"]["met"] is True
    assert t["ours-awq+gptq mean KL <= ours-gptq"]["met"] is False
    assert t["ours-awq top-k exact >= llmc-awq"]["met"] is True
    assert t["ours-awq wall time <= llmc-awq / 3"]["met"] is True
    res["ours-awq"]["wall_s"] = 70.0
    assert bench.targets(res)["ours-awq wall time <= llmc-awq / 3"]["met"] is False
    del res["llmc-awq"]
    t = bench.targets(res)
    assert t["ours-awq mean KL <= 0.6 x llmc-awq"]["met"] is None  # a missing variant is not judged
    assert "not judged" in bench.targets_text(t)


def test_awq_summary_counts_identity_choices_and_the_router_check(tmp_path):
    chk = {"mlp.gate": {"bit_identical": True, "max_abs_change": 0.0, "topk_flips": 0, "rows": 100}}
    layers = [{"layer": i, "seconds": 1.0, "linears": {}, "awq": [
        {"source": "input_layernorm", "readers": ["q"], "alpha": 0.3 if i else None, "loss_before": 2.0,
         "loss_after": 1.5 if i else 2.0},
        {"source": "post_attention_layernorm", "readers": ["mlp.experts.gate_up_proj"], "float_readers": ["mlp.gate"],
         "alpha": None, "loss_before": 4.0, "loss_after": 4.0, "float_readers_check": chk},
        {"source": "mlp.experts.gate_up_proj#up", "readers": ["mlp.experts.down_proj"],
         "alpha": [0.2, None, 0.1], "loss_before": [1.0, 1.0, 2.0], "loss_after": [0.5, 1.0, 1.5]},
    ]} for i in range(2)]
    (tmp_path / "moecompress.json").write_text(json.dumps({"layers": layers, "timings_s": {"total": 3.0}}))
    s = bench.awq_summary(tmp_path)
    assert s["by_source"]["input_layernorm"] == {"layers": 2, "skipped": 0, "identity_members": 1, "members": 2}
    assert s["by_source"]["post_attention_layernorm"]["identity_members"] == 2
    assert s["by_source"]["mlp.experts.gate_up_proj#up"] == {"layers": 2, "skipped": 0, "identity_members": 2,
                                                             "members": 6}
    up = [g for g in s["groups"] if g["source"].endswith("#up")][0]
    assert abs(up["loss_ratio"] - 3.0 / 4.0) < 1e-12
    assert s["router_check"] == {"groups_checked": 2, "all_bit_identical": True, "max_abs_change": 0.0,
                                 "topk_flips": 0, "rows": 200}
    assert "post_attention_layernorm: identity 2/2" in bench.identity_text({"ours-awq": {"awq": s}})
