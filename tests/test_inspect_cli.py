"""`moecompress inspect`: what it reports of float, quantized and partly quantized checkpoints."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import run_cli as _run
from moecompress.cli import main


def test_inspect_reports_family_and_sizes(capsys, tiny_ckpt, tmp_path):
    rc = main(["inspect", str(tiny_ckpt("deepseek_v3"))])
    out = capsys.readouterr().out
    assert rc == 0
    assert "deepseek_v3" in out and "dense: [0]" in out and "8 routed, top-2" in out
    assert "mlp.gate" in out and "int4" in out
    # a small model counts in millions (it read "0.001 B total"); its 64-wide experts take no group of 128,
    # which quantize's default would be refused for: inspect says what to pass
    assert re.search(r"parameters +\d+\.\d{3} M total, \d+\.\d{3} M active per token", out), out
    assert re.search(r"default group size 128 does not divide \S+'s input dimension 64: pass --group-size 64", out)
    rc = main(["quantize", str(tiny_ckpt("deepseek_v3")), "--out", str(tmp_path / "q"), "--group-size", "64",
               "--method", "rtn"])
    assert rc == 0  # the advice works
    from moecompress.inspect import _group_misfit

    assert _group_misfit({120: "a", 64: "b"}, 128) == {"dim": 64, "linear": "b", "fits": None}  # -> per channel
    assert _group_misfit({256: "a", 128: "b"}, 128) is None


def _with_mtp(src, dst):
    """A copy of ``src`` with MTP tensors (``mtp.*``) beside the text model, as Qwen3.5 checkpoints have."""
    import torch
    from safetensors.torch import load_file, save_file

    d = shutil.copytree(src, dst)
    tensors = load_file(d / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.randn(128, 256)
    tensors["mtp.norm.weight"] = torch.ones(128)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_inspect_lists_non_text_parts_as_kept(capsys, tmp_path, tiny_ckpt):
    src = _with_mtp(tiny_ckpt("qwen3_5_moe"), tmp_path / "m")
    assert main(["inspect", str(src)]) == 0
    kept = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("kept"))
    assert "model.visual (vision tower)" in kept and "mtp (MTP layers)" in kept and "unchanged" in kept


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_inspect_quantized_checkpoint(capsys, tmp_path, tiny_ckpt, fmt):
    from moecompress.inspect import describe

    src = _with_mtp(tiny_ckpt("qwen3_5_moe"), tmp_path / "m")
    q = tmp_path / "q"
    rc, err = _run(capsys, "quantize", str(src), "--out", str(q), "--method", "rtn", "--group-size", "32",
                   "--format", fmt, "--threads", "1", "--calib-samples", "4", "--seq-len", "32")
    assert rc == 0, err
    assert main(["inspect", str(q)]) == 0
    out = capsys.readouterr().out
    # (AWQ stores a symmetric weight as zero points 8 under zero_point: true; moecompress.json says symmetric)
    assert f"already quantized: {fmt}" in out and "int4, group 32, symmetric" in out
    assert "int8 ~" not in out and "int4 ~" not in out and "-0.000" not in out
    assert "mlp.experts.*.up_proj" in out and "mtp (MTP layers)" in out
    before, after = describe(src), describe(q)
    for key in ("params_total", "params_active", "params_experts"):
        assert after[key] == before[key] > 0, key
    assert after["params_experts"] < after["params_total"]
    assert after["size_estimate_bytes"] is None and after["quantization"]["bits"] == 4


def test_inspect_names_the_layers_a_partly_ignored_kind_is_kept_in(tmp_path, tiny_ckpt):
    """--ignore of one layer's attention: the kind is quantized in the others and kept there, and says where."""
    from conftest import quick_config
    from moecompress.inspect import describe
    from moecompress.pipeline import quantize

    q = tmp_path / "q"
    quantize(tiny_ckpt("qwen3_moe"), q, quick_config(method="rtn", ignore=("layers[.]0[.]self_attn",)))
    d = describe(q)
    assert "self_attn.q_proj" in d["quantized"] and "self_attn.q_proj (layer 0)" in d["kept"]
    assert "mlp.gate" in d["kept"]  # kept everywhere: no layers named


def test_a_layer_past_num_hidden_layers_that_is_no_declared_mtp_layer_is_questioned(capsys, caplog, tmp_path,
                                                                                       tiny_ckpt):
    """config.json says 1 layer, the shards hold 2, and no MTP layer is declared (``num_nextn_predict_layers``):
    inspect does not call the second an MTP layer, and quantize warns (the layer is carried through in float)."""
    d = shutil.copytree(tiny_ckpt("qwen3_moe"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    assert main(["inspect", str(d)]) == 0
    kept = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("kept"))
    assert "model.layers.1 (past num_hidden_layers 1, not a declared MTP layer: is num_hidden_layers right?)" in kept
    with caplog.at_level("WARNING"):
        assert main(["quantize", str(d), "--out", str(tmp_path / "q"), "--method", "rtn", "--group-size", "32"]) == 0
    assert "past config.json's num_hidden_layers 1, which declares no MTP layer" in caplog.text
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1, num_nextn_predict_layers=1)))
    assert main(["inspect", str(d)]) == 0
    assert "model.layers.1 (MTP layer)" in capsys.readouterr().out
