"""Block-output tuning of solved codes and scales (quant.tune, ``quantize --tune-steps``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import quick_config
from moecompress.checkpoint.dequant import dequantized_state
from moecompress.errors import UserError
from moecompress.pipeline import quantize
from moecompress.quant.rtn import rtn_quantize
from moecompress.quant.spec import QuantSpec
from moecompress.quant.tune import TuneItem, start, tune_codes


class _Block(nn.Module):
    """A stand-in decoder layer: two linears with a nonlinearity between them, and a residual."""

    def __init__(self, h=64, f=128):
        super().__init__()
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def _setup(bits=3, seed=0):
    torch.manual_seed(seed)
    block = _Block()
    xs = [torch.randn(4, 16, 64) for _ in range(4)]
    with torch.no_grad():
        refs = [block(x) for x in xs]
    spec = QuantSpec(bits=bits, group_size=32, symmetric=True, clip_ratios=(1.0,))
    floats = {n: p.detach().clone() for n, p in block.named_parameters()}
    items = [TuneItem(n, rtn_quantize(p.detach(), spec), floats[n]) for n, p in block.named_parameters()]
    with torch.no_grad():  # the layer holds the solved (here: round-to-nearest) weights, as in the pipeline
        for it in items:
            block.get_parameter(it.name).copy_(it.qw.dequantize())
    run = lambda b, w: torch.func.functional_call(block, w, (xs[b],))  # noqa: E731
    return block, items, run, refs


def _loss(block, items, qws, xs_refs):
    run, refs = xs_refs
    w = {it.name: q.dequantize() for it, q in zip(items, qws)}
    with torch.no_grad():
        return sum(float(torch.mean((run(b, w) - refs[b]) ** 2)) for b in range(len(refs))) / len(refs)


def test_tuning_lowers_the_block_loss_and_moves_codes_by_at_most_one():
    block, items, run, refs = _setup()
    new, info = tune_codes(block, items, run, refs, steps=60, lr=0.01, max_scale_change=0.0)
    before = _loss(block, items, [it.qw for it in items], (run, refs))
    after = _loss(block, items, new, (run, refs))
    assert info["kept"] and info["loss_before"] == pytest.approx(before, rel=1e-5)
    assert info["loss_after"] == pytest.approx(after, rel=1e-5)  # the record is the written weights' loss
    assert after < 0.9 * before, (before, after)
    assert info["codes_changed"] > 0
    for it, q in zip(items, new):
        d = q.qweight.int() - it.qw.qweight.int()
        assert int(d.abs().max()) == 1 and 0 <= int(q.qweight.min()) and int(q.qweight.max()) <= it.qw.spec.qmax
        assert torch.equal(q.zeros, it.qw.zeros) and torch.equal(q.scales, it.qw.scales)


def test_tuned_scales_are_bounded_and_stored_in_the_formats_dtype():
    block, items, run, refs = _setup()
    new, info = tune_codes(block, items, run, refs, steps=60, lr=0.01, max_scale_change=0.2,
                           scale_dtype=torch.bfloat16)
    assert info["kept"] and info["loss_after"] < 0.9 * info["loss_before"]
    assert info["loss_after"] == pytest.approx(_loss(block, items, new, (run, refs)), rel=1e-5)
    for it, q in zip(items, new):
        assert torch.equal(q.zeros, it.qw.zeros)
        ratio = q.scales / it.qw.scales
        assert float((ratio - 1).abs().max()) <= 0.2 + 0.01  # bounded, up to the bf16 rounding of the scale
        assert float((ratio - 1).abs().max()) > 0
        assert torch.equal(q.scales, q.scales.to(torch.bfloat16).float())  # written as the format stores them


def test_tuning_that_cannot_help_keeps_the_solved_weights():
    block, items, run, _ = _setup()
    with torch.no_grad():  # the targets are the solved layer's own outputs: its loss is already 0
        refs = [run(b, {}) for b in range(4)]
    new, info = tune_codes(block, items, run, refs, steps=10, lr=0.05)
    assert not info["kept"] and info["loss_before"] == 0.0
    assert all(q is it.qw for it, q in zip(items, new))


def test_offsets_start_at_the_float_weights_position_inside_the_code_cell():
    _, items, _, _ = _setup()
    it = items[0]
    u = start(it)
    assert float(u.abs().max()) < 0.5
    # the float weight's distance to its code, in code units, where it lies inside the code's cell (RTN:
    # everywhere but at the clamped top code of a symmetric range); 0 elsewhere
    d = (it.weight - it.qw.dequantize()) / it.qw.scales.repeat_interleave(32, dim=-1)
    inside = d.abs() < 0.5
    assert 0.9 * d.numel() < int(inside.sum()) < d.numel()
    clear = d.abs() < 0.499  # away from the cell edge, where the two computations may round apart
    assert torch.allclose(u[clear], d[clear], atol=1e-4) and not u[d.abs() > 0.501].any()
    assert torch.equal(start(TuneItem(it.name, it.qw)), torch.zeros_like(u))


def test_pipeline_tunes_every_layer_and_writes_the_tuned_codes(tiny_ckpt, tmp_path):
    src = tiny_ckpt("qwen3_moe")
    plain = quantize(src, tmp_path / "plain", quick_config(bits=3, calib_samples=16))
    tuned = quantize(src, tmp_path / "tuned", quick_config(bits=3, calib_samples=16, tune_steps=40))
    recs = [r["tune"] for r in tuned["layers"]]
    assert len(recs) == len(plain["layers"]) and all("tune" not in r for r in plain["layers"])
    assert any(r["kept"] and r["codes_changed"] > 0 for r in recs), recs
    for r in recs:
        assert r["loss_after"] < r["loss_before"] or not r["kept"]
    a, b = dict(dequantized_state(tmp_path / "plain")), dict(dequantized_state(tmp_path / "tuned"))
    first_kept = next(i for i, r in enumerate(recs) if r["kept"])
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert any(f"layers.{first_kept}." in n for n in changed)
    # layers before the first tuned one saw the same inputs and kept their codes
    assert not any(f"layers.{i}." in n for n in changed for i in range(first_kept))
    assert json.loads((tmp_path / "tuned" / "moecompress.json").read_text())["recipe"]["tune_steps"] == 40


def test_tuning_needs_calibration_data():
    with pytest.raises(UserError, match="tune_steps"):
        quick_config(method="rtn", tune_steps=10)
    quick_config(method="rtn", measure_errors=True, tune_steps=10)  # RTN with its calibration pass: fine


def test_a_tuned_run_resumed_after_a_crash_gives_the_same_bytes(tmp_path, monkeypatch):
    """The float trajectory the tuning aims at is saved with the feed: a resumed run writes the same bytes."""
    from moecompress import pipeline
    from moecompress.tiny import save_tiny
    from test_quantize_resume import digest

    src = save_tiny("qwen3_moe", tmp_path / "m", num_hidden_layers=3)
    cfg = quick_config(bits=3, calib_samples=8, tune_steps=30, tune_lr=0.05)
    ref = quantize(src, tmp_path / "ref", cfg)
    assert ref["layers"][2]["tune"]["kept"]  # the layer resumed at is tuned: its targets matter
    real = pipeline._quantize_layer

    def crashing(layer_mod, i, *a, **kw):
        if i == 2:
            raise RuntimeError("simulated crash")
        return real(layer_mod, i, *a, **kw)

    monkeypatch.setattr(pipeline, "_quantize_layer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize(src, tmp_path / "q", cfg)
    monkeypatch.undo()
    feeds = list((tmp_path / ".q.partial").glob("feed-*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(feeds[0]), "pt") as f:
        assert any(k.startswith("reference.") for k in f.keys())
    summary = quantize(src, tmp_path / "q", cfg, resume=True)
    assert summary["resumed_at"] == [2]
    assert digest(tmp_path / "q") == digest(tmp_path / "ref")


def test_the_targets_follow_the_float_models_trajectory():
    from moecompress.calib.runner import LayerFeed
    from moecompress.quant.tune import float_outputs

    block = _Block()
    q, f = [torch.randn(2, 5, 64)], [torch.randn(2, 5, 64)]
    calls = [{0: ((), {})}]
    with torch.no_grad():
        assert torch.equal(float_outputs(block, 0, LayerFeed(q, calls, reference=f))[0], block(f[0]))
        assert torch.equal(float_outputs(block, 0, LayerFeed(q, calls))[0], block(q[0]))


@pytest.mark.parametrize("kind", ["act-order group (g_idx)", "awq+gptq", "zero experts", "deepseek_v3"])
def test_tuning_runs_with_every_layout(tiny_ckpt, tmp_path, kind):
    """Permuted groups, AWQ-scaled layers, zero-expert routers and MLA/shared experts: tuned and read back."""
    from moecompress.zero.inject import add_zero_experts

    src, kw = tiny_ckpt("qwen3_moe"), {}
    if kind.startswith("act-order"):
        kw = dict(format="gptq", act_order="group")
    elif kind == "awq+gptq":
        kw = dict(method="awq+gptq")
    elif kind == "zero experts":
        src = add_zero_experts(src, tmp_path / "z", 2, "same", seed=0) and tmp_path / "z"
    else:
        src = tiny_ckpt(kind)
    s = quantize(src, tmp_path / "q", quick_config(bits=4, calib_samples=8, tune_steps=20, tune_lr=0.05, **kw))
    assert all("tune" in r for r in s["layers"])
    for name, t in dequantized_state(tmp_path / "q"):
        assert torch.isfinite(t.float()).all(), name
