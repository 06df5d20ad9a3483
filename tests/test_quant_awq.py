"""AWQ: the pure scale search, folds that leave every family's float model unchanged, and the method's gains."""

from __future__ import annotations

import pytest
import torch

from moecompress.arch.registry import BY_MODEL_TYPE
from moecompress.quant.awq import (alpha_grid, candidate_scales, hessian_loss, scaled_error, search_scales,
                                   weight_mean)
from moecompress.quant.balance import fold, resolve
from moecompress.quant.gptq import accumulate_hessian, gptq_quantize
from moecompress.quant.rtn import rtn_quantize
from moecompress.quant.spec import QuantSpec
from moecompress.quant.targets import layer_targets
from moecompress.tiny import build_tiny

from conftest import FAMILIES

SPEC = QuantSpec(bits=4, group_size=32, symmetric=False)


def test_grid_and_candidate_scales():
    assert alpha_grid(4) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError):
        alpha_grid(0)
    x = torch.tensor([[1.0, 4.0, 16.0]])
    s = candidate_scales(x, None, 0.5, pow2=False)
    torch.testing.assert_close(s, torch.tensor([[0.5, 1.0, 2.0]]))  # sqrt(x), normalized to geometric mid 1
    p = candidate_scales(torch.tensor([[1.0, 3.0, 16.0]]), None, 0.5, pow2=True)
    assert torch.equal(torch.log2(p), torch.round(torch.log2(p)))  # powers of two


def test_search_finds_the_known_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 64, generator=g) * 10 + 0.1
    w = torch.rand(3, 64, generator=g) + 0.1
    target = candidate_scales(x, w, 0.35, pow2=False)

    def loss(s):
        return ((s - target) ** 2).sum(-1)

    choice = search_scales(loss, x, w, alpha_grid(20), pow2=False)
    assert choice.alpha == [0.35] * 3
    assert max(choice.loss_after) < 1e-9 < min(choice.loss_before)

    # the identity wins when nothing beats it, and ties keep it
    flat = search_scales(lambda s: ((s - 1) ** 2).sum(-1), x, w, alpha_grid(20), pow2=False)
    assert flat.alpha == [None] * 3 and torch.equal(flat.scales, torch.ones_like(x))


def test_search_rejects_non_finite_losses():
    x = torch.ones(1, 8)
    with pytest.raises(ValueError, match="NaN/Inf"):
        search_scales(lambda s: torch.full((1,), float("nan")), x, None, alpha_grid(4), pow2=False)


def test_hessian_loss_is_the_readers_output_error():
    g = torch.Generator().manual_seed(1)
    xin = torch.randn(256, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
    w = torch.randn(2, 16, 64, generator=g)
    h, n = accumulate_hessian(None, xin, 0)
    s = torch.exp(0.3 * torch.randn(2, 64, generator=g))
    got = hessian_loss([w], [h.expand(2, 64, 64)], s, SPEC)
    d = scaled_error(w, s, SPEC, h.diagonal().expand(2, -1))  # quantized as --method awq will
    want = 2.0 / n * torch.einsum("tk,bnk->btn", xin, d).square().sum(dim=(1, 2))
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-6)


def test_weight_mean_normalizes_per_group():
    w = torch.zeros(1, 2, 64)
    w[0, 0, :32] = 2.0
    w[0, 1, 32:] = torch.linspace(0.5, 1.0, 32)
    m = weight_mean([w], SPEC)
    assert torch.allclose(m[0, :32], torch.full((32,), 0.5))  # row 0: all at the group max; row 1: zero
    assert torch.allclose(m[0, 32:], torch.linspace(0.5, 1.0, 32) / 2)


def outlier_layer(seed=0, n=96, k=256, t=2048):
    """A linear whose inputs have a few large channels, as trained LLM activations do (AWQ's premise)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=g)[:8]] = 20.0
    x = torch.randn(t, k, generator=g) * scale * torch.exp(0.3 * torch.randn(k, generator=g))
    w = torch.randn(n, k, generator=g) * 0.05
    h, _ = accumulate_hessian(None, x, 0)
    return w, x, h


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 64)])
def test_awq_beats_rtn_and_awq_gptq_beats_gptq(bits, group):
    w, x, h = outlier_layer()
    spec = QuantSpec(bits=bits, group_size=group, symmetric=False)
    x_mean = x.abs().mean(0)[None]
    w_mean = weight_mean([w[None]], spec)
    choice = search_scales(lambda s: hessian_loss([w[None]], [h[None]], s, spec), x_mean, w_mean,
                           alpha_grid(20), pow2=False)
    s = choice.scales[0]
    assert choice.alpha[0] is not None

    def err(wq):
        return (x @ (w - wq).T).square().sum().item()

    ws, hs = w * s, h / (s[:, None] * s[None, :])
    e_rtn = err(rtn_quantize(w, spec, h.diagonal()).dequantize())
    e_awq = err(rtn_quantize(ws, spec, hs.diagonal()).dequantize() / s)
    e_gptq = err(gptq_quantize(w, h, spec)[0].dequantize())
    e_awq_gptq = err(gptq_quantize(ws, hs, spec)[0].dequantize() / s)
    # measured over seeds 0-2: awq / rtn (its clip search weighted by diag H, as ours is) 0.71-0.75,
    # awq+gptq / gptq 0.72-0.76 (alpha 0.15-0.35)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    assert e_awq_gptq < 0.8 * e_gptq, (e_awq_gptq, e_gptq)
    # the search scores a candidate by the error --method awq then gets: its loss is that error
    assert abs(choice.loss_after[0] * x.shape[0] / 2 - e_awq) < 1e-3 * e_awq


def _scales(shape, pow2: bool, g):
    e = torch.randint(-2, 3, shape, generator=g).float()
    return torch.exp2(e) if pow2 else torch.exp2(e + 0.37 * torch.rand(shape, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_fold_leaves_the_float_model_unchanged(family, dtype):
    """Every balance group of every layer folded with random scales: pow2 bit-exact, free to rounding."""
    g = torch.Generator().manual_seed(7)
    model = build_tiny(family, dtype=dtype)
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    spec = BY_MODEL_TYPE[model.config.model_type]
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for pow2 in (True, False):
        inexact = not pow2
        with torch.no_grad():
            for layer in text.layers:
                names = {t.name for t in layer_targets(layer, spec, False)}
                for grp in resolve(layer, spec, names, names):
                    rows = layer.get_submodule(grp.group.source.removesuffix("#up")) if not grp.group.source.endswith(
                        "#up") else None
                    r = rows.weight.shape[0] if grp.source_kind == "norm" else (
                        rows.out_features if grp.source_kind == "linear" else layer.mlp.experts.down_proj.shape[-1])
                    b = layer.mlp.experts.down_proj.shape[0] if grp.group.per_expert else 1
                    own = {n: p.dtype for n, p in layer.named_parameters()}  # stored as held
                    fold(layer, spec, grp, _scales((b, r), pow2, g), dtype, {}, {}, stored=own.__getitem__)
                    inexact |= grp.source_kind == "norm" and spec.norm_weight_offset != 0
            out = model(input_ids=ids).logits
        if inexact:
            tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
            rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert rel < tol, f"{family} pow2={pow2}: relative change {rel:.2e}"
        else:
            assert torch.equal(out, ref), f"{family}: pow2 fold changed the logits"
        ref = out


def test_search_tries_duo_and_activation_only_scales_per_member(gen):
    """With the weight term the search covers both families: each member keeps the candidate its loss
    prefers, and the record says which family it came from."""
    x = torch.rand(2, 16, generator=gen) + 0.1
    w = torch.rand(2, 16, generator=gen) + 0.1
    grid = alpha_grid(4)
    target = torch.stack([candidate_scales(x, None, grid[2], False)[0], candidate_scales(x, w, grid[1], False)[1]])
    choice = search_scales(lambda s: ((s - target) ** 2).sum(-1), x, w, grid, pow2=False)
    assert choice.duo == [False, True] and choice.alpha == [grid[2], grid[1]]
    torch.testing.assert_close(choice.scales, target)
    only = search_scales(lambda s: ((s - target) ** 2).sum(-1), x, None, grid, pow2=False)
    assert only.duo == [False, False]
