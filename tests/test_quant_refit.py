"""Scale refit: the least-squares optimum for fixed codes, never worse, exact against a brute-force solve."""

import pytest
import torch

from moecompress.quant.gptq import accumulate_hessian, gptq_quantize
from moecompress.quant.refit import refit_scales
from moecompress.quant.spec import QuantizedWeight, QuantSpec


def _layer(seed, b=2, n=24, k=128, t=512):
    g = torch.Generator().manual_seed(seed)
    ws, hs = [], []
    for _ in range(b):
        a = torch.randn(k, k, generator=g) / k**0.5
        x = (torch.randn(t, k, generator=g) @ a) * torch.exp(0.5 * torch.randn(k, generator=g))
        ws.append(torch.randn(n, k, generator=g))
        hs.append(accumulate_hessian(None, x, 0)[0])
    return torch.stack(ws), torch.stack(hs)


def _loss(w, wq, h):
    d = (w - wq).double()
    return float(((d @ h.double()) * d).sum())


def _damped(h, damp):
    h = h.clone()
    h.diagonal(dim1=-2, dim2=-1).add_(damp * h.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True))
    return h


@pytest.mark.parametrize("act,sym", [(None, True), ("weight", True), ("group", True), (None, False)])
def test_refit_lowers_gptq_loss_and_keeps_codes(act, sym):
    w, h = _layer(0)
    spec = QuantSpec(bits=3, group_size=32, symmetric=sym, act_order=act)
    qw, _ = gptq_quantize(w, h, spec)
    new, info = refit_scales(w, qw, h, damp=0.01)
    assert torch.equal(new.qweight, qw.qweight) and torch.equal(new.zeros, qw.zeros)
    hd = _damped(h, 0.01)
    for i in range(w.shape[0]):
        before = _loss(w[i], qw[i].dequantize(), hd[i])
        after = _loss(w[i], new[i].dequantize(), hd[i])
        # measured: after/before 0.958-0.981 on these inputs (W3 g32)
        assert after < 0.99 * before, f"member {i}: refit {after:.4g} vs GPTQ {before:.4g}"
        assert info["loss_after"][i] == pytest.approx(after, rel=1e-4)
        assert info["loss_before"][i] == pytest.approx(before, rel=1e-4)


def test_refit_matches_brute_force_least_squares():
    w, h = _layer(1, b=1, n=3, k=64)
    spec = QuantSpec(bits=4, group_size=16)
    qw, _ = gptq_quantize(w, h, spec)
    new, _ = refit_scales(w, qw, h, damp=0.0)
    hd = h[0].double()
    L = torch.linalg.cholesky(hd)  # loss = |L^T (w - C s)|^2
    for r in range(3):
        c = qw.qweight[0, r].double() - qw.zeros[0, r].double().repeat_interleave(16)
        design = torch.zeros(64, 4, dtype=torch.float64)
        for gi in range(4):
            design[gi * 16:(gi + 1) * 16, gi] = c[gi * 16:(gi + 1) * 16]
        s = torch.linalg.lstsq(L.T @ design, L.T @ w[0, r].double()).solution
        torch.testing.assert_close(new.scales[0, r].double(), s, rtol=1e-4, atol=1e-7)


def test_group_with_all_codes_at_zero_point_keeps_its_scale():
    w, h = _layer(2, b=1, n=4, k=64)
    spec = QuantSpec(bits=4, group_size=32)
    qw, _ = gptq_quantize(w, h, spec)
    q = qw.qweight.clone()
    q[0, 0, :32] = qw.zeros[0, 0, 0]  # row 0, group 0: every code at the zero point
    qw = QuantizedWeight(q, qw.scales, qw.zeros, spec)
    new, _ = refit_scales(w, qw, h)
    assert new.scales[0, 0, 0] == qw.scales[0, 0, 0]
    assert bool(torch.isfinite(new.scales).all()) and bool((new.scales > 0).all())


def test_gptq_with_fixed_qparams_uses_them():
    w, h = _layer(3)
    spec = QuantSpec(bits=3, group_size=32)
    qw, _ = gptq_quantize(w, h, spec)
    ref, _ = refit_scales(w, qw, h)
    again, st = gptq_quantize(w, h, spec, qparams=(ref.scales, ref.zeros))
    assert torch.equal(again.scales, ref.scales.float()) and torch.equal(again.zeros, ref.zeros)
    assert not any(st["fallback"])
    with pytest.raises(ValueError, match="original column order"):
        gptq_quantize(w, h, QuantSpec(bits=3, group_size=32, act_order="group"), qparams=(ref.scales, ref.zeros))


@pytest.mark.parametrize("act", [None, "weight", "group"])
def test_refine_never_worse_per_row_and_better_overall(act):
    from moecompress.quant.refit import refine

    w, h = _layer(4)
    spec = QuantSpec(bits=3, group_size=32, act_order=act)
    qw, _ = gptq_quantize(w, h, spec)
    out, info = refine(w, h, qw, rounds=2)
    hd = _damped(h, 0.01)
    for i in range(w.shape[0]):
        d0 = (w[i] - qw[i].dequantize()).double()
        d1 = (w[i] - out[i].dequantize()).double()
        r0 = ((d0 @ hd[i].double()) * d0).sum(-1)
        r1 = ((d1 @ hd[i].double()) * d1).sum(-1)
        assert bool((r1 <= r0 * (1 + 1e-6)).all()), "a row got worse"
        # measured: 0.91-0.95 of GPTQ's loss after 2 rounds (act_order None/weight), ~0.96 refit-only (group)
        assert info["loss_after"][i] < 0.985 * info["loss_before"][i]
    assert int(out.qweight.max()) <= spec.qmax
    if act == "group":
        assert torch.equal(out.qweight, qw.qweight) and torch.equal(out.g_idx, qw.g_idx)


@pytest.mark.parametrize("sym", [True, False])
def test_refit_reround_beats_one_refit_and_keeps_nearest_codes(sym):
    """AWQ's codes: alternating refits with re-rounding is never worse per row than one refit, lower overall,
    and every row's codes are either round-to-nearest at its scales or those codes with refit scales."""
    from moecompress.quant.refit import refit_reround
    from moecompress.quant.rtn import quantize_with_qparams, rtn_quantize

    w, h = _layer(5, n=48)
    spec = QuantSpec(bits=3, group_size=32, symmetric=sym)
    qw = rtn_quantize(w, spec, None, h)
    once, _ = refit_scales(w, qw, h)
    out, info = refit_reround(w, qw, h)
    hd = _damped(h, 0.01)
    d_once = (w - once.dequantize()).double()
    d_out = (w - out.dequantize()).double()
    r_once = ((d_once @ hd.double()) * d_once).sum(-1)
    r_out = ((d_out @ hd.double()) * d_out).sum(-1)
    assert bool((r_out <= r_once * (1 + 1e-9)).all())
    # measured: 0.974 (sym) and 0.979 (asym) of one refit's loss on these inputs (W3 g32)
    assert float(r_out.sum()) < 0.99 * float(r_once.sum())
    assert info["loss_after"] == pytest.approx(r_out.sum(-1).tolist(), rel=1e-6)
    assert torch.equal(out.zeros, qw.zeros)
    nearest = quantize_with_qparams(w, out.scales, out.zeros, spec)
    rows_nearest = (nearest == out.qweight).all(-1)
    assert bool(rows_nearest.any())
    with pytest.raises(ValueError, match="natural order"):
        refit_reround(w, QuantizedWeight(qw.qweight, qw.scales, qw.zeros, spec, torch.zeros(128, dtype=torch.int32)), h)
