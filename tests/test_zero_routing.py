"""Routing with zero experts as pure functions: the slot weightings, relative zero logits, the skipping rules."""

from __future__ import annotations

import math

import pytest
import torch

from moecompress.zero.routing import apply_rule, route_zero


def test_relative_zero_row_of_zeros_is_the_threshold_rule():
    """Relative zero logits with a zero row and bias log(beta), original weights: exactly the slots the
    threshold rule beta drops (the real slots below beta x the top weight) go to the zero expert."""
    g = torch.Generator().manual_seed(4)
    real = torch.randn(256, 8, generator=g) * 2
    beta = 0.3
    zero = torch.full((256, 7), math.log(beta)) + real.max(-1, keepdim=True).values  # Z = k - 1
    kw = dict(top_k=4, scoring="softmax", renormalize=True)
    w, ids = route_zero(real, zero, weights="original", **kw)
    w_real, ids_real = route_zero(real, zero[:, :0], **kw)
    want = apply_rule(w_real, ids_real, ("threshold", beta), 8)
    assert 0.1 < float((want >= 8).float().mean()) < 0.6
    assert torch.equal(torch.sort(torch.where(ids >= 8, 8, ids), -1).values, torch.sort(want, -1).values)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_original_weights_are_the_real_only_routing(scoring):
    """``original``: ids as the merged top-k; each real slot the weight of the real-only routing, zero
    slots 0; tokens with no zero slot are exactly the renormalized routing's."""
    g = torch.Generator().manual_seed(3)
    t, e, z, k = 64, 8, 3, 4
    real, zero = torch.randn(t, e, generator=g), torch.randn(t, z, generator=g) - 0.5
    kw = dict(top_k=k, scoring=scoring, renormalize=True)
    if scoring == "sigmoid":
        kw.update(correction_bias=torch.rand(e + z, generator=g) * 0.1, n_group=2, topk_group=1, scaling=2.5)
    w_r, ids_r = route_zero(real, zero, **kw)
    w_o, ids_o = route_zero(real, zero, weights="original", **kw)
    if "correction_bias" in kw:
        w_real, ids_real = route_zero(real, zero[:, :0], **dict(kw, correction_bias=kw["correction_bias"][:e]))
    else:
        w_real, ids_real = route_zero(real, zero[:, :0], **kw)
    assert torch.equal(ids_o, ids_r)
    live = ids_o < e
    none = live.all(-1)
    assert 0 < int(none.sum()) < t  # both kinds of tokens occur
    assert torch.equal(w_o[none], w_real[none]) and torch.equal(ids_o[none], ids_real[none].to(ids_o.dtype))
    torch.testing.assert_close(w_o[none], w_r[none])  # the zero rows' mass cancels in the renormalization
    assert bool((w_o[~live] == 0).all())
    for i in range(t):
        for j in range(k):
            if live[i, j]:
                (where,) = torch.nonzero(ids_real[i] == ids_o[i, j]).flatten().tolist()
                assert w_o[i, j] == w_real[i, where]
    # the kept real experts are the best of the real-only top-k: the zero slots displace the lowest
    with pytest.raises(ValueError, match="weighting"):
        route_zero(real, zero, weights="sum", **kw)


def test_apply_rule_semantics():
    w = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    ids = torch.tensor([[0, 1, 2], [3, 8, 1]])  # id 8 is already a zero slot (E = 8)
    assert apply_rule(w, ids, ("threshold", 0.5), 8).tolist() == [[0, 1, 8], [3, 8, 8]]
    assert apply_rule(w, ids, ("top-p", 0.75), 8).tolist() == [[0, 1, 8], [3, 8, 8]]
    assert apply_rule(w, ids, ("top-k", 1), 8).tolist() == [[0, 8, 8], [3, 8, 8]]
    assert apply_rule(w, ids, None, 8) is ids


def test_apply_rule_fast_path_for_sorted_slots_equals_the_general_one():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        w = torch.rand(5, 6, generator=g).sort(-1, descending=True).values
        ids = torch.randint(0, 10, (5, 6), generator=g)  # some slots already on zero experts (>= 8)
        for rule in (("top-k", 3.0), ("top-p", 0.6), ("threshold", 0.5)):
            assert torch.equal(apply_rule(w, ids, rule, 8), apply_rule(w, ids, rule, 8, sorted_desc=True)), rule


@pytest.mark.parametrize("skips_e", [True, False], ids=["eager-skips-id-E", "eager-one-hot-over-E"])
def test_zero_slots_contribute_nothing_whichever_eager_transformers_has(skips_e, monkeypatch):
    """transformers 5.25's eager experts skip id E; 5.17's (the GPU image's) one-hot over E classes fails on it.
    Either way a zero slot adds nothing: the same output as the real slots alone."""
    import torch.nn.functional as F
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from moecompress.zero import modules as zm

    cfg = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    real_one_hot = F.one_hot

    def one_hot(t, num_classes=-1):  # E + 1 classes: id E is skipped (5.25); E classes: it raises (5.17)
        return real_one_hot(t, num_classes=5 if skips_e else 4)

    monkeypatch.setattr(F, "one_hot", one_hot)
    monkeypatch.setattr(zm, "_EAGER_SKIPS_E", {})
    h = torch.randn(5, 16)
    ids = torch.tensor([[0, 4], [1, 2], [5, 3], [4, 5], [2, 0]])  # 4, 5: zero experts
    w = torch.rand(5, 2)
    live = ids < 4
    want = experts(h, torch.where(live, ids, 0), torch.where(live, w, 0.0))  # zero slots at weight 0
    if not skips_e:
        with pytest.raises(RuntimeError):
            experts(h, torch.where(live, ids, 4), w)
    experts.__class__ = zm._skipping_class(Qwen3MoeExperts)
    got = experts(h, ids, w)
    assert zm._EAGER_SKIPS_E[type(experts)] is skips_e
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the probe runs on CPU tensors and never on the weights (on a GPU, an id out of one_hot's range is a
    # device-side assert): weights and hidden states on the meta device give the same answer
    zm._EAGER_SKIPS_E.clear()
    experts.to("meta")
    assert zm._eager_skips_id_e(experts, torch.empty(5, 16, device="meta"), 4) is skips_e
