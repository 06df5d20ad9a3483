"""`quantize --method awq|awq+gptq` end to end: exact router compensation, exported folds, records, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moecompress.cli import main
from moecompress.pipeline import quantize
from moecompress.tiny import build_tiny, byte_tokenizer

from conftest import quick_config
from test_cli_errors import _assert_clean, _run

# sigmoid routers (fp32 logits), a shared expert gate, Mixtral's names, MLA attention
AWQ_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe_lite"]


def _hidden_outliers(model, g):
    """Give the post-attention norm a few large channels and shrink every reader's columns to match.

    An exact power-of-two fold (the float model is unchanged, bit for bit): the MoE block's input now
    has outlier channels read by small weights, the situation AWQ exists for, so its search has
    something to find on a random tiny model."""
    text = model.model
    with torch.no_grad():
        for layer in text.layers:
            mlp = layer.mlp
            if not hasattr(mlp, "experts"):
                continue
            h = layer.post_attention_layernorm.weight.shape[0]
            s = torch.ones(h)
            s[torch.randperm(h, generator=g)[:4]] = 16.0
            layer.post_attention_layernorm.weight.mul_(s.to(layer.post_attention_layernorm.weight.dtype))
            for name, p in mlp.named_parameters():
                if p.shape[-1] == h and not name.endswith("down_proj") and not name.endswith("down_proj.weight"):
                    p.div_(s.to(p.dtype))


def _save(family, path, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    model = build_tiny(family, dtype=dtype)
    _hidden_outliers(model, g)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path, save_original_format=True)
    byte_tokenizer().save_pretrained(path)
    return path


def _mlp_records(summary):
    return [g for r in summary["layers"] for g in r.get("awq", []) if g["source"] == "post_attention_layernorm"]


@pytest.mark.parametrize("family", AWQ_FAMILIES)
def test_awq_routing_bit_identical_and_exported(family, tmp_path):
    src = _save(family, tmp_path / "src")
    s = quantize(src, tmp_path / "out", quick_config(method="awq", symmetric=False))
    recs = _mlp_records(s)
    assert recs and any(r.get("alpha") is not None for r in recs), recs  # the hidden outliers were found
    for r in recs:
        if not r["float_readers"]:  # a dense layer: nothing reads the norm unquantized, scales are free
            assert not r.get("pow2")
            continue
        assert r["pow2"] and all(v["bit_identical"] and v["topk_flips"] == 0 for v in r["float_readers_check"].values())
    # the written norms and routers are the source's times exact powers of two, and route identically
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    x = torch.randn(64, a["model.embed_tokens.weight"].shape[1]).to(torch.bfloat16)
    changed = 0
    for r in s["layers"]:
        i = r["layer"]
        if not any(g["source"] == "post_attention_layernorm" and "alpha" in g and g["float_readers"]
                   for g in r.get("awq", [])):
            continue
        norm, gate = f"model.layers.{i}.post_attention_layernorm.weight", f"model.layers.{i}.{moe}.gate.weight"
        assert b[gate].dtype == a[gate].dtype and b[norm].dtype == a[norm].dtype
        ratio = (a[norm].float() / b[norm].float())
        assert torch.equal(torch.exp2(torch.round(torch.log2(ratio))), ratio)  # powers of two
        changed += int((ratio != 1).sum())
        la = torch.nn.functional.linear((x * a[norm]).to(a[gate].dtype), a[gate])
        lb = torch.nn.functional.linear((x * b[norm]).to(b[gate].dtype), b[gate])
        assert torch.equal(la, lb), f"layer {i}: router logits changed"
    assert changed > 0
    # routers stay out of quantization in every spelling loaders use
    assert any(n.endswith(f"layers.1.{moe}.gate") for n in cfg["quantization_config"]["ignore"])
    assert s["recipe"]["method"] == "awq"


def test_awq_free_scales_measure_the_router_change(tmp_path):
    src = _save("qwen3_moe", tmp_path / "src")
    s = quantize(src, tmp_path / "out", quick_config(method="awq", awq_scales="free", symmetric=False))
    recs = [r for r in _mlp_records(s) if r.get("alpha") is not None]
    assert recs and not any(r["pow2"] for r in recs)
    chk = [v for r in recs for v in r["float_readers_check"].values()]
    assert any(not v["bit_identical"] and v["max_abs_change"] > 0 for v in chk), chk
    assert all(len(r["float_reader_scales"]) == 64 or len(r["float_reader_scales"]) > 0 for r in recs)


def test_awq_beats_plain_rtn_on_the_block_loss(tmp_path):
    """The scale search's own loss: after <= before for every group, strictly better somewhere."""
    src = _save("qwen2_moe", tmp_path / "src")
    s = quantize(src, tmp_path / "out", quick_config(method="awq+gptq", symmetric=False))
    groups = [g for r in s["layers"] for g in r["awq"] if "loss_after" in g]
    flat = []
    for g in groups:
        la, lb = g["loss_after"], g["loss_before"]
        flat += list(zip(la, lb)) if isinstance(la, list) else [(la, lb)]
    assert all(a <= b for a, b in flat) and any(a < 0.99 * b for a, b in flat)
    assert {g["source"] for g in groups} >= {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                              "mlp.experts.gate_up_proj#up", "mlp.shared_expert.up_proj"}
    methods = {v["method"] for r in s["layers"] for k, v in r["linears"].items() if isinstance(v, dict)}
    assert methods == {"gptq"}


def test_zero_centered_norm_groups_skip_in_pow2_mode(tmp_path, tiny_ckpt):
    s = quantize(tiny_ckpt("qwen3_5_moe"), tmp_path / "out", quick_config(method="awq"))
    mlp = _mlp_records(s)
    assert mlp and all("(1 + weight)" in r["skipped"] for r in mlp)
    done = [g for r in s["layers"] for g in r["awq"] if "skipped" not in g]
    assert any(g["source"] == "mlp.experts.gate_up_proj#up" for g in done)


def test_awq_bad_input_one_line(capsys, tmp_path, tiny_ckpt, monkeypatch):
    from dataclasses import replace

    from moecompress.arch import registry

    qwen = tiny_ckpt("qwen3_moe")
    base = ["quantize", str(qwen), "--group-size", "32", "--calib-samples", "4", "--seq-len", "32", "--threads", "1"]
    for extra, want in ((["--method", "awq", "--act-order", "group", "--format", "gptq"], "act_order applies to GPTQ only"),
                        (["--method", "awq", "--awq-grid", "0"], "alpha grid needs at least one point"),
                        (["--method", "awq", "--awq-scales", "exact"], "exact")):
        out = tmp_path / "o1"
        rc, err = _run(capsys, *base, "--out", str(out), *extra)
        assert rc == 2 and len(err) == 1 and want in err[0], (extra, err)
        _assert_clean(tmp_path, out)

    monkeypatch.setitem(registry.BY_MODEL_TYPE, "qwen3_moe", replace(registry.BY_MODEL_TYPE["qwen3_moe"], awq_groups=()))
    rc, err = _run(capsys, *base, "--out", str(tmp_path / "o2"), "--method", "awq")
    assert rc == 2 and err == ["error: the qwen3_moe family has no AWQ balance groups; use --method gptq or rtn"], err
    monkeypatch.undo()

    from moecompress.quant import balance

    monkeypatch.setattr(balance, "hessian_loss", lambda *a, **k: torch.full((1,), float("inf")))
    out = tmp_path / "o3"
    rc, err = _run(capsys, *base, "--out", str(out), "--method", "awq")
    assert rc == 2 and len(err) == 1 and "try --dtype float32" in err[0] and "non-finite" in err[0], err
    _assert_clean(tmp_path, out)


def test_inspect_shows_the_awq_plan(capsys, tiny_ckpt):
    rc = main(["inspect", str(tiny_ckpt("deepseek_v3"))])
    out = capsys.readouterr().out
    assert rc == 0 and "awq group     self_attn.kv_a_layernorm -> self_attn.kv_b_proj" in out
    assert "post_attention_layernorm -> mlp.experts.gate_up_proj" in out and "exact for mlp.gate" in out
    main(["inspect", str(tiny_ckpt("qwen3_5_moe"))])
    assert "cannot fold exactly" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "glm4_moe"])
def test_awq_checkpoint_loads_in_transformers(family, tmp_path):
    """Symmetric AWQ output (compressed-tensors) loads with no missing/unexpected keys and equals our dequantized weights."""
    from test_export_interop import check_loads_and_matches_dequantized

    src = _save(family, tmp_path / "src", dtype=torch.float32)
    quantize(src, tmp_path / "out", quick_config(method="awq+gptq"))
    check_loads_and_matches_dequantized(src, tmp_path / "out", tmp_path, f"{family} awq+gptq")
