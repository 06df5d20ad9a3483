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
