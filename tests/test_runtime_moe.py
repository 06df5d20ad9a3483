"""The runtime's CPU expert loop against the fused-MoE reference twin, zero experts included."""

from __future__ import annotations

import pytest
import torch

from moecompress.kernels.fused_moe import fused_moe_torch
from moecompress.runtime.moe import Experts, MoEBlock, Routing


@pytest.mark.parametrize("tokens", [1, 7])
def test_cpu_experts_match_reference_twin_and_drop_zero_experts(gen, tokens):
    e, h, i, k = 4, 32, 16, 3
    w13 = torch.randn(e, 2 * i, h, generator=gen)
    w2 = torch.randn(e, h, i, generator=gen)
    x = torch.randn(tokens, h, generator=gen)
    ids = torch.randint(0, e + 2, (tokens, k), generator=gen)  # ids 4 and 5 are zero experts
    ids[0] = torch.tensor([1, e, e + 1])  # one live expert, two zero experts in the first row
    weights = torch.rand(tokens, k, generator=gen)
    ours = Experts(w13, w2, use_kernels=False)(x, weights, ids)
    ref = fused_moe_torch(x, w13, w2, weights, ids, num_experts=e)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_moe_block_with_zero_experts_in_the_router(gen):
    # a router with more rows than experts (ZEDA): tokens routed only to zero experts get exactly 0
    e, z, h, i = 4, 2, 32, 16
    router = torch.zeros(e + z, h)
    router[e:] = 10.0  # the zero experts win every token with positive features
    experts = Experts(torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen), use_kernels=False)
    block = MoEBlock(router, None, experts, Routing(top_k=2, scoring="softmax", renormalize=True))
    x = torch.rand(1, 5, h, generator=gen) + 0.1
    assert torch.equal(block(x), torch.zeros_like(x))


@pytest.mark.parametrize("rule", [None, ("top-k", 5.0), ("threshold", 0.3), ("top-p", 0.7)])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
@pytest.mark.parametrize("weights,relative", [("renormalized", False), ("original", False), ("original", True),
                                              ("renormalized", True)])
def test_one_token_fast_path_matches_the_general_path(gen, rule, scaling, weights, relative):
    """Decode on the torch path: the top-k of the logits + a softmax over them (or the real top-k merged
    with the zero logits, for relative zero logits and the original weights), the rule on lists and the
    per-expert views give the general path's experts and outputs (to rounding), zero experts included."""
    e, z, h, i, k = 16, 4, 32, 16, 8
    router = torch.randn(e + z, h, generator=gen)
    bias = torch.cat([torch.zeros(e), torch.full((z,), -2.0 if relative else 1.5)])
    # unit-scale experts: outputs O(1), so the 1e-4 tolerance below is about the routing, not fp32 rounding
    experts = Experts(torch.randn(e, 2 * i, h, generator=gen) * h ** -0.5, torch.randn(e, h, i, generator=gen) * i ** -0.5,
                      use_kernels=False)
    block = MoEBlock(router, None, experts, Routing(top_k=k, scoring="softmax", renormalize=True, num_zero=z,
                                                    rule=rule, scaling=scaling, zero_weights=weights,
                                                    zero_relative=relative), logit_bias=bias)
    assert block._one_token_route
    skipped = 0
    for _ in range(40):
        x = torch.randn(1, 1, h, generator=gen)
        ids, w = block._route_one(x[0])
        ref_w, ref_ids = block.route(x[0])
        assert ids == ref_ids[0].tolist()
        torch.testing.assert_close(torch.tensor(w), ref_w[0], rtol=1e-6, atol=1e-7)
        skipped += sum(j >= e for j in ids)
        general = _experts_torch_ref(block, x[0], ref_w, ref_ids)
        torch.testing.assert_close(block(x)[0], general, rtol=1e-4, atol=1e-4)
    assert skipped > 0  # zero experts (and the rule) took slots


def test_one_token_path_follows_the_blocks_tensors(gen):
    """The decode closures see in-place changes of the block's weights (they hold views, not copies) and are
    made again after ``.to()``."""
    e, h, i, k = 8, 16, 8, 2
    experts = Experts(torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen), use_kernels=False)
    block = MoEBlock(torch.randn(e, h, generator=gen), None, experts, Routing(top_k=k, scoring="softmax", renormalize=True))
    x = torch.randn(1, 1, h, generator=gen)
    block(x)
    assert "_decode" in block.__dict__
    with torch.no_grad():
        block.router_weight.neg_()
        block.experts.w2.mul_(3.0)
    ref_w, ref_ids = block.route(x[0])
    torch.testing.assert_close(block(x)[0], _experts_torch_ref(block, x[0], ref_w, ref_ids), rtol=1e-5, atol=1e-5)
    block.to("cpu")
    assert "_decode" not in block.__dict__


def _experts_torch_ref(block, x, w, ids):
    from moecompress.runtime.moe import _experts_torch

    two = torch.cat([x, x])  # two tokens: the general (sorted, grouped) path
    return _experts_torch(two, block.experts.w13, block.experts.w2, torch.cat([w, w]), torch.cat([ids, ids]))[:1]


def test_fast_path_is_off_where_routing_differs(gen):
    e, h, i = 8, 16, 8
    experts = Experts(torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen), use_kernels=False)
    router = torch.randn(e, h, generator=gen)
    for routing, bias in ((Routing(top_k=2, scoring="sigmoid", renormalize=True), None),
                          (Routing(top_k=2, scoring="softmax", renormalize=False), None),
                          (Routing(top_k=2, scoring="softmax", renormalize=True), torch.zeros(e)),
                          (Routing(top_k=2, scoring="softmax", renormalize=True, n_group=2, topk_group=1), None)):
        assert not MoEBlock(router, bias, experts, routing)._one_token_route


@pytest.mark.parametrize("kind,value", [("top-k", 3.0), ("top-k", 0.0), ("threshold", 0.5), ("threshold", 0.0),
                                        ("top-p", 0.5), ("top-p", 1.0)])
def test_apply_rule_one_matches_apply_rule(gen, kind, value):
    from moecompress.zero.routing import apply_rule, apply_rule_one

    e, k = 10, 6
    for _ in range(50):
        w, ids = torch.rand(1, 14, generator=gen).softmax(-1).topk(k, dim=-1)
        ids = ids.to(torch.int32)
        ref = apply_rule(w, ids, (kind, value), e, sorted_desc=True)[0].tolist()
        assert apply_rule_one(w[0].tolist(), ids[0].tolist(), (kind, value), e) == ref
