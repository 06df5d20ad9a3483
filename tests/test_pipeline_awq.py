"""`quantize --method awq|awq+gptq` end to end: exact router compensation, exported folds, records, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moecompress.arch.registry import BY_MODEL_TYPE
from moecompress.cli import main
from moecompress.pipeline import quantize
from moecompress.quant.spec import QuantSpec
from moecompress.tiny import build_tiny, byte_tokenizer

from conftest import quick_config
from test_cli_errors import _assert_clean, _run

# sigmoid routers (fp32 logits), a shared expert gate, Mixtral's names, MLA attention, a float DSA indexer
AWQ_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe_lite", "deepseek_v2", "minimax_m2",
                "deepseek_v32", "glm_moe_dsa"]


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
    moe = BY_MODEL_TYPE[family].disk_moe_name
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


@pytest.mark.parametrize("family,setting", [("qwen3_moe", "router_dtype"), ("deepseek_v3", "router_dtype"),
                                            ("qwen3_moe", "dtype"), ("ernie4_5_moe", "dtype")])
def test_a_narrower_calibration_dtype_rounds_nothing_written(family, setting, tmp_path):
    """An fp32 checkpoint whose routers run in bf16 (``--router-dtype bfloat16``) or whose whole calibration does
    (``--dtype bfloat16``): the written routers and norms are the source's times AWQ's exact power-of-two scales,
    bit for bit -- the bf16 copies calibration runs on are never written."""
    src = _save(family, tmp_path / "src", dtype=torch.float32)
    s = quantize(src, tmp_path / "out", quick_config(method="awq", **{setting: "bfloat16"}))
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    folded = 0
    for r in s["layers"]:
        i = r["layer"]
        gate, norm = f"model.layers.{i}.mlp.gate.weight", f"model.layers.{i}.post_attention_layernorm.weight"
        if gate not in a:
            continue
        ratio = a[norm] / b[norm]  # the fold: norm / s, router columns * s
        assert torch.equal(torch.exp2(torch.round(torch.log2(ratio))), ratio), f"layer {i}: not powers of two"
        assert b[gate].dtype == torch.float32 and torch.equal(b[gate], a[gate] * ratio), f"layer {i}"
        folded += int((ratio != 1).sum())
    assert folded > 0, "no scale was folded into a router: the test would not see a rounded router"


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


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_zero_centered_norm_groups_skip_in_pow2_mode(tmp_path, tiny_ckpt, family):
    s = quantize(tiny_ckpt(family), tmp_path / "out", quick_config(method="awq"))
    mlp = _mlp_records(s)
    assert mlp and all("(1 + weight)" in r["skipped"] for r in mlp)
    done = [g for r in s["layers"] for g in r["awq"] if "skipped" not in g]
    assert any(g["source"] == "mlp.experts.gate_up_proj#up" for g in done)


def test_awq_bad_input_one_line(capsys, tmp_path, tiny_ckpt, monkeypatch):
    from dataclasses import replace

    from moecompress.arch import registry

    qwen = tiny_ckpt("qwen3_moe")
    base = ["quantize", str(qwen), "--group-size", "32", "--calib-samples", "4", "--seq-len", "32", "--threads", "1"]
    for extra, want in ((["--method", "awq", "--act-order", "group", "--format", "gptq"], "--act-order applies to GPTQ only"),
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


@pytest.mark.parametrize("family,sources", [
    ("qwen3_moe", {"input_layernorm"}),
    ("deepseek_v3", {"input_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm"})])
def test_attention_groups_are_scored_by_the_attention_output(family, sources, tmp_path):
    """The groups read inside attention search on the attention block's output; the others keep their loss."""
    src = _save(family, tmp_path / "src")
    s = quantize(src, tmp_path / "out", quick_config(method="awq", symmetric=False))
    recs = [g for r in s["layers"] for g in r["awq"] if "skipped" not in g]
    by_loss = {g["source"]: g["loss"] for g in recs}
    assert {k for k, v in by_loss.items() if v == "attention"} == sources
    assert by_loss["post_attention_layernorm"] == "block"
    if family == "qwen3_moe":
        assert by_loss["self_attn.v_proj"] == "outputs"
    for g in recs:
        if g["loss"] == "attention":
            assert 0 < g["loss_after"] <= g["loss_before"]


def test_attention_loss_is_the_attention_output_error():
    """``_attention_loss(s)``: the squared change of ``self_attn``'s output with q/k/v quantized at scales
    ``s`` (computed here by calling the attention module directly), and the weights are restored after."""
    from moecompress.arch.registry import BY_MODEL_TYPE
    from moecompress.calib.runner import attention_half, capture_layer_kwargs
    from moecompress.quant.awq import scaled_error
    from moecompress.quant.balance import AwqSettings, _attention_loss, _head_repeat, resolve
    from moecompress.quant.gptq import accumulate_hessian

    torch.manual_seed(0)
    model = build_tiny("qwen3_moe", dtype=torch.float32).eval()
    spec = BY_MODEL_TYPE["qwen3_moe"]
    ids = torch.randint(0, model.config.vocab_size, (4, 24))
    feed = capture_layer_kwargs(model, ids, 2, "cpu")
    layer = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    group = [g for g in resolve(layer, spec, set(names), set(names)) if g.group.source == "input_layernorm"][0]
    assert group.group.loss == "attention"
    x = torch.cat([layer.input_layernorm(h).reshape(-1, h.shape[-1]) for h in feed.hidden]).detach()
    h, _ = accumulate_hessian(None, x, 0)

    class _St:
        def hessian(self):
            return h

    stats = {n: _St() for n in names}
    settings = AwqSettings(QuantSpec(bits=3, group_size=32, symmetric=False))
    loss = _attention_loss(layer, group, lambda: attention_half(layer, 0, feed), settings, stats,
                                 _head_repeat(layer, group))
    before = {n: layer.get_submodule(n).weight.detach().clone() for n in names}
    s = torch.exp2(torch.randn(1, x.shape[-1]) * 0.5)

    def attn_out():
        outs = []
        for b, hid in enumerate(feed.hidden):
            args, kwargs = feed.calls[b][0]
            kw = {k: v for k, v in kwargs.items() if k in ("position_embeddings", "attention_mask")}
            outs.append(layer.self_attn(hidden_states=layer.input_layernorm(hid), **kw)[0])
        return outs

    with torch.no_grad():
        ref = attn_out()
        for n in names:
            w = layer.get_submodule(n).weight
            w.data = w.data - scaled_error(w.data[None], s, settings.spec, h.diagonal()[None])[0]
        want = sum(((o.double() - r.double()) ** 2).sum() for o, r in zip(attn_out(), ref))
        for n in names:
            layer.get_submodule(n).weight.data = before[n]
    got = loss(s)
    torch.testing.assert_close(got, want.reshape(1), rtol=1e-3, atol=1e-9)
    assert float(got) > 0 and float(loss(torch.ones_like(s))) > 0
    assert all(torch.equal(layer.get_submodule(n).weight, before[n]) for n in names)  # restored


def test_attention_windows_are_the_same_for_every_rank_count():
    """Whole batches evenly spaced by global index, about search_tokens tokens of them, whatever the chunks."""
    from moecompress.calib.runner import LayerFeed
    from moecompress.layer_quantize import CalibPlan, _attention_windows
    from moecompress.quant.balance import AwqSettings

    hidden = [torch.full((2, 16, 4), float(b)) for b in range(8)]
    feed = LayerFeed(hidden, [{0: ((), {"b": b}), 1: ((), {"b": -b})} for b in range(8)])
    cfg = quick_config(method="awq", batch_size=2, seq_len=16)
    layer = torch.nn.Linear(4, 4)
    for tokens, want in ((64, [0, 4]), (32, [0]), (10_000, list(range(8)))):
        awq = AwqSettings(QuantSpec(bits=4), search_tokens=tokens)
        for chunks in ([range(0, 8)], [range(0, 4), range(4, 8)], [range(0, 3), range(3, 6), range(6, 8)]):
            w = _attention_windows(layer, 1, feed, CalibPlan(chunks), cfg, awq)
            assert [int(x[0, 0, 0]) for x in w.hidden] == want
            assert [c[1][1]["b"] for c in w.calls] == [-b for b in want]
