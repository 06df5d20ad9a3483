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
from moecompress.quant.tune import TuneItem, _weight, start_offsets, tune_codes


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
    qws = {n: rtn_quantize(p.detach(), spec) for n, p in block.named_parameters()}
    items = [TuneItem(n, q, start_offsets(q, floats[n])) for n, q in qws.items()]
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
    block, items, _, _ = _setup()
    it = items[0]
    u = it.offset.float()
    torch.manual_seed(0)
    float_weight = _Block().up.weight.detach()  # the same seed: the float weight _setup quantized
    assert float(u.abs().max()) < 0.5
    # the float weight's distance to its code, in code units, where it lies inside the code's cell (RTN:
    # everywhere but at the clamped top code of a symmetric range); 0 elsewhere
    d = (float_weight - it.qw.dequantize()) / it.qw.scales.repeat_interleave(32, dim=-1)
    inside = d.abs() < 0.5
    assert 0.9 * d.numel() < int(inside.sum()) < d.numel()
    clear = d.abs() < 0.499  # away from the cell edge, where the two computations may round apart
    assert torch.allclose(u[clear], d[clear], atol=1e-3) and not u[d.abs() > 0.501].any()  # fp16
    # step 0 is the solved weight exactly: no offset reaches the edge of its cell
    assert torch.equal(_weight(it.qw, u, None), it.qw.dequantize())


def test_pipeline_tunes_every_layer_and_writes_the_tuned_codes(tiny_ckpt, tmp_path):
    src = tiny_ckpt("qwen3_moe")
    plain = quantize(src, tmp_path / "plain", quick_config(bits=3, calib_samples=16))
    tuned = quantize(src, tmp_path / "tuned", quick_config(bits=3, calib_samples=16, tune_steps=40))
    recs = [r["tune"] for r in tuned["layers"]]
    assert len(recs) == len(plain["layers"]) and all("tune" not in r for r in plain["layers"])
    assert any(r["kept"] and r["codes_changed"] > 0 for r in recs), recs
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


def test_step_zero_is_the_solved_weight_with_permuted_and_per_expert_groups():
    """Offsets at their start reproduce the codes for batched weights with a g_idx per member."""
    from moecompress.quant.spec import QuantizedWeight

    torch.manual_seed(1)
    e, n, k, g = 3, 8, 64, 16
    w = torch.randn(e, n, k)
    g_idx = torch.stack([torch.randperm(k) // g for _ in range(e)]).int()  # act-order groups, per expert
    scales = torch.rand(e, n, k // g) * 0.1 + 0.05
    zeros = torch.full((e, n, k // g), 8, dtype=torch.uint8)
    qw = QuantizedWeight(torch.zeros(e, n, k, dtype=torch.uint8), scales, zeros, QuantSpec(bits=4, group_size=g), g_idx)
    s = torch.gather(scales, -1, g_idx.long().unsqueeze(1).expand(e, n, k))
    qw.qweight = torch.clamp(torch.round(w / s + 8), 0, 15).to(torch.uint8)
    off = start_offsets(qw, w)
    assert torch.equal(_weight(qw, off.float(), None), qw.dequantize())
    inside = ((w / s + 8) - qw.qweight.float()).abs() < 0.49
    assert torch.allclose(off.float()[inside], ((w / s + 8) - qw.qweight.float())[inside], atol=1e-3)


def test_frozen_members_keep_their_codes_and_scales():
    """Experts solved from too few tokens (frozen) are not moved by the tuning; the others are."""
    from moecompress.quant.spec import QuantizedWeight

    torch.manual_seed(2)

    class _Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 16, 32) * 0.1)

        def forward(self, x):  # every token through every expert, summed
            return torch.einsum("btk,enk->btn", x, self.w)

    mod = _Experts()
    spec = QuantSpec(bits=3, group_size=32, symmetric=True, clip_ratios=(1.0,))
    parts = [rtn_quantize(mod.w.detach()[i], spec) for i in range(4)]
    qw = QuantizedWeight(*(torch.stack([getattr(q, f) for q in parts]) for f in ("qweight", "scales", "zeros")), spec)
    xs = [torch.randn(2, 8, 32) for _ in range(3)]
    with torch.no_grad():
        refs = [mod(x) for x in xs]
        mod.w.copy_(qw.dequantize())
    frozen = torch.tensor([True, False, True, False])
    item = TuneItem("w", qw, start_offsets(qw, torch.stack([p for p in mod.w.detach()])), frozen)
    run = lambda b, w: torch.func.functional_call(mod, w, (xs[b],))  # noqa: E731
    (new,), info = tune_codes(mod, [item], run, refs, steps=40, lr=0.02)
    assert info["kept"] and info["frozen_members"] == 2
    for e in (0, 2):
        assert torch.equal(new.qweight[e], qw.qweight[e]) and torch.equal(new.scales[e], qw.scales[e])
    assert all(not (torch.equal(new.qweight[e], qw.qweight[e]) and torch.equal(new.scales[e], qw.scales[e]))
               for e in (1, 3))


def test_the_next_layer_is_fed_by_the_tuned_layer(tiny_ckpt, tmp_path, monkeypatch):
    """After tuning changed a layer's weights, its outputs (the next layer's inputs) are recomputed with them,
    not taken from what was computed with the solved weights (attention half, kept expert inputs)."""
    from moecompress import pipeline
    from moecompress.calib.runner import layer_output

    real = pipeline._quantize_layer
    checked = []

    def checking(layer_mod, i, targets, feed, *a, **kw):
        inputs = list(feed.hidden)
        out = real(layer_mod, i, targets, feed, *a, **kw)
        with torch.no_grad():
            for b, x in enumerate(inputs):
                args, kwargs = feed.calls[b][i]
                want = layer_output(layer_mod(x, *args, **kwargs))
                assert torch.allclose(feed.hidden[b], want, atol=1e-5, rtol=1e-4), (i, b)
        checked.append(out[0]["tune"]["kept"])
        return out

    monkeypatch.setattr(pipeline, "_quantize_layer", checking)
    quantize(tiny_ckpt("qwen3_moe"), tmp_path / "q", quick_config(bits=3, calib_samples=8, tune_steps=30, tune_lr=0.05))
    assert len(checked) == 2 and any(checked)


def test_tuning_settings_without_tuning_are_refused():
    for kw in (dict(tune_lr=0.01), dict(tune_scale_change=0.1)):
        with pytest.raises(UserError, match="set tune_steps too"):
            quick_config(**kw)
    quick_config(tune_steps=5, tune_lr=0.01, tune_scale_change=0.1)


@pytest.mark.parametrize("layout", ["groups", "batched-asym", "act-order", "act-order-shared", "act-order-2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slice_elements", [None, 100])
def test_the_weights_own_backward_matches_autograd(layout, dtype, slice_elements, monkeypatch):
    """``_TunedWeight`` (recomputes in its backward, a slice of rows at a time) against ``_weight`` (torch's
    autograd): the same weight, the same offset gradients bit for bit (clamped codes included), the same scale
    gradients to rounding; in one slice, and in slices of one row (or one expert) at a time."""
    from moecompress.quant import tune
    from moecompress.quant.spec import QuantizedWeight
    from moecompress.quant.tune import _TunedWeight

    if slice_elements:
        monkeypatch.setattr(tune, "_SLICE_ELEMENTS", slice_elements)

    torch.manual_seed(3)
    e, n, k, g = (None, 8, 64, 16) if layout in ("groups", "act-order-2d") else (3, 8, 64, 16)
    shape = (n, k) if e is None else (e, n, k)
    gshape = shape[:-1] + (k // g,)
    scales = torch.rand(gshape) * 0.1 + 0.05
    zeros = (torch.randint(2, 14, gshape) if layout == "batched-asym" else torch.full(gshape, 8)).to(torch.uint8)
    g_idx = {"act-order": lambda: torch.stack([torch.randperm(k) // g for _ in range(e)]).int(),  # per expert
             "act-order-shared": lambda: (torch.randperm(k) // g).int(),  # one for every expert
             "act-order-2d": lambda: (torch.randperm(k) // g).int()}.get(layout, lambda: None)()
    qw = QuantizedWeight(torch.randint(0, 16, shape, dtype=torch.uint8), scales, zeros,
                         QuantSpec(bits=4, group_size=g, symmetric=layout != "batched-asym"), g_idx)
    u0 = torch.rand(shape) * 2 - 1  # codes 0 and 15 pushed past the clamp too
    a0 = (torch.rand(gshape) - 0.5) * 0.4
    gw = torch.randn(shape)
    outs = []
    for fn in (lambda u, a: _weight(qw, u, a).to(dtype), lambda u, a: _TunedWeight.apply(u, a, qw, dtype)):
        u, a = u0.clone().requires_grad_(), a0.clone().requires_grad_()
        w = fn(u, a)
        outs.append((w.detach(), *torch.autograd.grad(w, (u, a), gw.to(dtype))))
    (w1, gu1, ga1), (w2, gu2, ga2) = outs
    assert w2.dtype == dtype and torch.equal(w1, w2)
    assert torch.equal(gu1, gu2) and (gu1 == 0).any()  # zero where the clamp bites
    assert torch.allclose(ga1, ga2, rtol=1e-5, atol=1e-6)
    # without scale changes (``a`` None) only the offsets get a gradient
    u = u0.clone().requires_grad_()
    (gu3,) = torch.autograd.grad(_TunedWeight.apply(u, None, qw, torch.float32), (u,), gw)
    assert torch.equal(gu3, torch.autograd.grad(_weight(qw, u, None), (u,), gw)[0])


def test_the_source_as_its_own_reference_changes_nothing(tiny_ckpt, tmp_path):
    """``tune_reference`` set to the source itself: the same targets, hence the same bytes, as without one."""
    from test_quantize_resume import digest

    src = tiny_ckpt("qwen3_moe")
    cfg = dict(bits=3, calib_samples=8, tune_steps=15, tune_lr=0.05)
    quantize(src, tmp_path / "own", quick_config(**cfg))
    quantize(src, tmp_path / "ref", quick_config(**cfg, tune_reference=str(src)))
    assert digest(tmp_path / "ref") == digest(tmp_path / "own")


@pytest.mark.slow
def test_a_skipping_model_tuned_toward_its_original_comes_closer_to_it(quick_demo_cache, tmp_path):
    """A zero-expert model that skips half its slots (the static top-k rule on the quick demo model, trained),
    quantized and tuned toward the original it was made from, is closer to that original (KL on held-out
    text) than the same quantization tuned toward itself, and than the float skipping model (measured 0.89x
    and 0.89x)."""
    from moecompress.demo_model import demo_model_path
    from moecompress.evals.evaluate import evaluate
    from moecompress.zero.baselines import make_baseline

    src = demo_model_path(quick_demo_cache, quick=True)
    make_baseline(src, tmp_path / "skip", "top-k", 0.5, samples=8, seq_len=64)
    cfg = dict(bits=4, group_size=64, calib_samples=16, seq_len=128, tune_steps=40, tune_lr=0.05)
    quantize(tmp_path / "skip", tmp_path / "own", quick_config(**cfg))
    quantize(tmp_path / "skip", tmp_path / "toward", quick_config(**cfg, tune_reference=str(src)))
    kl = {d: evaluate(tmp_path / d, src, samples=16, seq_len=128)["kl"] for d in ("skip", "own", "toward")}
    assert kl["toward"] < 0.95 * kl["own"], kl
    assert kl["toward"] < 0.95 * kl["skip"], kl


def _perturbed_copy(src, dst):
    """``src`` with one attention weight of its last layer scaled (its embeddings, hence trajectory start, kept)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        state = load_file(f)
        for k in state:
            if k.endswith("layers.1.self_attn.o_proj.weight"):
                state[k] = state[k] * 1.5
        save_file(state, f, metadata={"format": "pt"})
    return dst


def test_the_targets_come_from_the_reference(tiny_ckpt, tmp_path, monkeypatch):
    """Another reference gives other codes than the source's own; a run that crashed resumes with the
    reference's path spelt differently (it is known by its files), and the output folder cannot be it."""
    from moecompress import pipeline
    from test_quantize_resume import digest

    src = tiny_ckpt("qwen3_moe")
    ref = _perturbed_copy(src, tmp_path / "ref")
    cfg = dict(bits=3, calib_samples=8, tune_steps=15, tune_lr=0.05)
    quantize(src, tmp_path / "own", quick_config(**cfg))
    quantize(src, tmp_path / "toward", quick_config(**cfg, tune_reference=str(ref)))
    assert digest(tmp_path / "toward") != digest(tmp_path / "own")
    real = pipeline._quantize_layer

    def crashing(layer_mod, i, *a, **kw):
        if i == 1:
            raise RuntimeError("simulated crash")
        return real(layer_mod, i, *a, **kw)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "_quantize_layer", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize(src, tmp_path / "q", quick_config(**cfg, tune_reference="ref"))
    monkeypatch.undo()
    quantize(src, tmp_path / "q", quick_config(**cfg, tune_reference=str(ref)), resume=True)
    assert digest(tmp_path / "q") == digest(tmp_path / "toward")
    with pytest.raises(UserError, match="an input of this run"):
        quantize(src, ref, quick_config(**cfg, tune_reference=str(ref)), overwrite=True)
    assert (ref / "config.json").is_file()


def test_a_reference_of_another_architecture_is_refused(tiny_ckpt, tmp_path):
    src = tiny_ckpt("qwen3_moe")
    for other, match in ((tiny_ckpt("mixtral"), "mixtral model"), (tiny_ckpt("qwen3_moe", num_hidden_layers=3),
                                                                   "num_hidden_layers"),
                         (tiny_ckpt("qwen3_moe", seed=1), "token embeddings differ")):
        with pytest.raises(UserError, match=match):
            quantize(src, tmp_path / "q", quick_config(tune_steps=5, tune_reference=str(other)))
    with pytest.raises(UserError, match="not a folder"):
        quantize(src, tmp_path / "q", quick_config(tune_steps=5, tune_reference=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="set tune_steps too"):
        quick_config(tune_reference=str(src))
    assert not (tmp_path / "q").exists()


def test_the_default_rate_stops_shrinking_past_200_steps():
    """0.4 / steps (0.8 at <= 3 bits) up to 200 steps; a longer run keeps the 200-step size and moves further."""
    from moecompress.quant.tune import default_lr

    assert default_lr(50, 4) == pytest.approx(0.008) and default_lr(200, 4) == pytest.approx(0.002)
    assert default_lr(1000, 4) == default_lr(200, 4) and default_lr(1000, 3) == pytest.approx(0.004)
    assert default_lr(100, 2) == pytest.approx(0.008)
