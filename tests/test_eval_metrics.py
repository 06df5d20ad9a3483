"""Pure evaluation metrics on constructed inputs with answers known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moecompress.evals.lm_metrics import LMAccumulator, logit_sums
from moecompress.evals.routing_metrics import (RouterOut, RoutingAccumulator, expert_histogram, load_summary,
                                               router_kl, selection_probs, topk_overlap)


def test_topk_overlap_known_sets():
    ids = torch.tensor([[0, 1], [1, 0], [0, 2], [3, 4]])
    ref = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 2]])
    exact, jac = topk_overlap(ids, ref)
    assert exact.tolist() == [True, True, False, False]  # order inside a set does not matter
    assert jac.tolist() == pytest.approx([1.0, 1.0, 1 / 3, 0.0])


def test_router_kl_known_value_and_zero():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    kl = router_kl(q, p)  # KL(p || q)
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert kl[1].item() == 0.0
    # a model router with an extra (zero-expert) row: the reference is padded with a zero
    q3 = torch.tensor([[0.25, 0.25, 0.5]])
    assert router_kl(q3, p[:1]).item() == pytest.approx(2 * 0.5 * math.log(2.0))


def test_selection_probs_softmax_and_bias_corrected_sigmoid():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert selection_probs(logits, "softmax")[0].tolist() == pytest.approx([0.25, 0.75])
    bias = torch.tensor([0.5, 0.0])
    s = torch.sigmoid(logits[0]) + bias  # [1.0, 0.75]
    assert selection_probs(logits, "sigmoid", bias)[0].tolist() == pytest.approx((s / s.sum()).tolist())
    # a negative corrected score is floored, not negative
    out = selection_probs(torch.tensor([[-20.0, 0.0]]), "sigmoid", torch.tensor([-0.5, 0.0]))
    assert (out > 0).all() and out.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        selection_probs(logits, "relu")


def test_expert_histogram_counts_skips_apart():
    ids = torch.tensor([[0, 4], [1, 5], [1, 0]])  # E = 4: ids 4 and 5 are zero experts (skips)
    counts, skips, slots = expert_histogram(ids, 4)
    assert counts.tolist() == [2, 2, 0, 0] and skips == 2 and slots == 6


def test_load_summary_uniform_and_peaked():
    frac, ent, mom = load_summary(torch.tensor([5, 5, 5, 5]))
    assert frac == [0.25] * 4 and ent == pytest.approx(math.log(4)) and mom == pytest.approx(1.0)
    frac, ent, mom = load_summary(torch.tensor([8, 0, 0, 0]))
    assert frac == [1.0, 0.0, 0.0, 0.0] and ent == 0.0 and mom == pytest.approx(4.0)


def _out(ids, n_rows, n_exp):
    ids = torch.tensor(ids)
    probs = torch.full((ids.shape[0], n_rows), 1.0 / n_rows)
    return RouterOut(probs, ids, n_exp)


def test_accumulator_identical_and_weighted_by_tokens():
    acc = RoutingAccumulator()
    a = _out([[0, 1], [2, 3]], 4, 4)
    acc.update(3, a, a)
    acc.update(5, _out([[0, 1]] * 3, 4, 4), _out([[0, 2]] * 3, 4, 4))
    r = acc.result()
    rows = {row["layer"]: row for row in r["routing"]["per_layer"]}
    assert rows[3] == {"layer": 3, "topk_exact": 1.0, "jaccard": 1.0, "router_kl": 0.0}
    assert rows[5]["topk_exact"] == 0.0 and rows[5]["jaccard"] == pytest.approx(1 / 3)
    assert r["routing"]["topk_exact"] == pytest.approx(2 / 5)  # 2 tokens of layer 3 agree, of 5
    assert r["routing"]["jaccard"] == pytest.approx((2 + 3 / 3) / 5)
    assert r["expert_load"]["layers"] == [3, 5]
    assert r["expert_load"]["model"][1] == [0.5, 0.5, 0.0, 0.0]
    assert r["expert_load"]["reference"][1] == [0.5, 0.0, 0.5, 0.0]
    assert r["skip_rate"] is None


def test_accumulator_skip_rate_with_zero_experts():
    acc = RoutingAccumulator()
    # model: E=4 real experts + 2 zero experts (ids 4, 5); reference: plain 4 experts
    model = _out([[0, 4], [5, 1], [2, 3], [4, 5]], 6, 4)
    ref = _out([[0, 1], [0, 1], [2, 3], [2, 3]], 4, 4)
    acc.update(0, model, ref)
    r = acc.result()
    assert r["skip_rate"] == {"model": [4 / 8], "reference": [None], "model_overall": 4 / 8,
                              "reference_overall": None}
    # the load histogram counts only slots routed to real experts
    assert r["expert_load"]["model"][0] == [0.25, 0.25, 0.25, 0.25]
    # real-expert sets: {0} vs {0,1}, {1} vs {0,1}, {2,3} vs {2,3}, {} vs {2,3}
    assert r["routing"]["per_layer"][0]["topk_exact"] == pytest.approx(1 / 4)
    assert r["routing"]["per_layer"][0]["jaccard"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4)
    act = r["active_experts"]
    assert act["model_histogram"] == [[1, 2, 1]] and act["reference_histogram"] == [[0, 0, 4]]
    assert act["model"] == [1.0] and act["reference"] == [2.0]
    assert act["expert_flops_saved"] == [0.5] and act["expert_flops_saved_overall"] == 0.5


def test_real_set_overlap_two_empty_sets_agree():
    from moecompress.evals.routing_metrics import real_set_overlap

    exact, jac = real_set_overlap(torch.tensor([[4, 5], [0, 4]]), torch.tensor([[4, 4], [4, 0]]), 4, 4)
    assert exact.tolist() == [True, True] and jac.tolist() == [1.0, 1.0]


def test_logit_sums_and_accumulator_known_answers():
    ids = torch.tensor([[0, 1, 2]])
    ref = torch.zeros(1, 3, 4)  # uniform: every next token has probability 1/4
    same = logit_sums(ref, ref, ids)
    assert same["nll"] == pytest.approx(2 * math.log(4)) and same["kl"] == 0.0 and same["agree"] == 3
    assert same["n_pred"] == 2 and same["n_pos"] == 3
    model = ref.clone()
    model[0, :, 3] = math.log(3.0)  # p = [1/6, 1/6, 1/6, 1/2]
    acc = LMAccumulator()
    acc.update("a", model, ref, ids)
    r = acc.result()
    kl_pos = 3 * 0.25 * math.log(0.25 / (1 / 6)) + 0.25 * math.log(0.25 / 0.5)
    assert r["kl"] == pytest.approx(kl_pos) and r["kl_per_dataset"]["a"] == pytest.approx(kl_pos)
    assert r["ppl"]["a"] == pytest.approx(6.0) and r["ppl_reference"]["a"] == pytest.approx(4.0)
    assert r["top1_agreement"] == 0.0  # argmax: expert 3 vs 0 (first of the uniform ties)


def test_router_tap_with_zero_expert_rows():
    """A router with rows beyond the experts (ZEDA zero experts): E comes from the experts module."""
    from types import SimpleNamespace

    from torch import nn

    from moecompress.evals.collect import RouterTap

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 4))  # 4 experts + 2 zero experts

        def forward(self, h):
            logits = h @ self.weight.T
            top = logits.topk(2, -1)
            return logits, top.values, top.indices

    layer = nn.Module()
    layer.mlp = nn.Module()
    layer.mlp.gate = Gate()
    layer.mlp.experts = nn.Module()
    layer.mlp.experts.gate_up_proj = nn.Parameter(torch.zeros(4, 2, 4))
    handle = SimpleNamespace(spec=SimpleNamespace(routers=("mlp.gate",), scoring="softmax", bias_path=None),
                             num_experts=99)
    h = torch.randn(5, 4)
    with RouterTap({7: layer}, handle) as tap:
        layer.mlp.gate(h)
    (out,) = tap.calls[7]
    assert out.num_experts == 4 and out.probs.shape == (5, 6) and out.ids.shape == (5, 2)
    assert torch.allclose(out.probs, torch.softmax(h @ layer.mlp.gate.weight.T, -1))
    layer.mlp.gate(h)  # hooks are gone after the context
    assert len(tap.calls[7]) == 1


@pytest.mark.parametrize("family", ["ernie4_5_moe", "minimax_m2"])
def test_router_tap_reads_the_selection_bias(tiny_ckpt, family):
    """ERNIE-4.5 ranks experts by softmax + a selection bias kept in ``moe_statics``, MiniMax-M2 by sigmoid + a
    bias its MoE block holds and passes to the router: the tapped selection scores are those, so each token's
    top-k by them is the set the router chose."""
    from moecompress.evals.collect import WholeModel

    wm = WholeModel(tiny_ckpt(family), "cpu", torch.float32)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    _, routers = wm.forward(ids)
    for out in routers.values():
        k = out.ids.shape[1]
        assert torch.equal(out.probs.topk(k, dim=-1).indices.sort(-1).values, out.ids.sort(-1).values)
