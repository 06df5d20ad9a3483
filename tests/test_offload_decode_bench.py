"""benchmarks/offload_decode.py: a CPU smoke run of main() (the split simulated on the CPU) on a tiny model."""

from __future__ import annotations

import json
import sys

def test_smoke_on_the_cpu(tiny_ckpt, tmp_path, capsys):
    from conftest import benchmark_module, quick_config

    from moecompress.pipeline import quantize

    q = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), q, quick_config(method="rtn", bits=4, group_size=32))
    out = tmp_path / "o.json"
    with benchmark_module("offload_decode") as mod:
        rc = mod.main(["--model", str(q), "--device", "cpu", "--near", "all,3,0", "--new-tokens", "8",
                       "--repeats", "3", "--json", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    moe_layers = 2  # the tiny qwen3_moe: 2 MoE layers of 8 experts
    assert [r["offloaded_experts"] for r in got["rows"]] == [0, 5 * moe_layers, 8 * moe_layers]
    assert all(r["decode_tokens_per_s"] > 0 and r["estimate_measured_bw"] > 0 for r in got["rows"])
    # more experts on the slow side: a lower estimate at the same bandwidths
    est = [r["estimate_default_bw"] for r in got["rows"]]
    assert est[0] > est[1] > est[2]
    assert "measured / estimate" in capsys.readouterr().out
    sys.modules.pop("cpu_packed_decode", None)
