"""route (Triton) against route_torch: softmax, sigmoid + correction bias + group-limited top-k, scaling."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

from moecompress.kernels.testing import assert_close, ensure_interpreter  # noqa: E402

DEVICE = ensure_interpreter()

from moecompress.kernels.routing import route, route_torch  # noqa: E402


pytestmark = pytest.mark.usefixtures("poisoned")


def _compare(logits, top_k, **kw):
    w, i = route(logits, top_k, **kw)
    cpu_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    w_ref, i_ref = route_torch(logits.cpu(), top_k, **cpu_kw)
    assert w.dtype == torch.float32 and i.dtype == torch.int32
    assert w.shape == i.shape == (logits.shape[0], top_k)
    mism = (i.cpu() != i_ref).nonzero()
    assert mism.numel() == 0, (
        f"ids differ first at {tuple(mism[0].tolist())}, shape {tuple(i.shape)}: "
        f"{i.cpu()[mism[0, 0]].tolist()} vs {i_ref[mism[0, 0]].tolist()}"
    )
    assert_close(w, w_ref, 1e-5, "routing weights")
    return w, i


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("e,top_k", [(8, 1), (8, 2), (10, 3), (64, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax(gen, t, e, top_k, renormalize):
    logits = torch.randn(t, e, generator=gen).to(DEVICE)
    w, _ = _compare(logits, top_k, renormalize=renormalize)
    if renormalize:
        assert_close(w.sum(-1), torch.ones(t), 1e-5, "renormalized sum")


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_grouped_deepseek(gen, t, renormalize):
    # DeepSeek-V3 shape in miniature: 64 experts in 8 groups, best 3 groups, top-6, scaled 2.5
    e = 64
    logits = torch.randn(t, e, generator=gen).to(DEVICE)
    bias = (0.1 * torch.randn(e, generator=gen)).to(DEVICE)
    w, i = _compare(
        logits, 6, renormalize=renormalize, scoring="sigmoid", correction_bias=bias,
        n_group=8, topk_group=3, routed_scaling_factor=2.5,
    )
    groups = (i.cpu().long() // 8)
    assert all(len(set(row.tolist())) <= 3 for row in groups), "experts from more than topk_group groups"
    if renormalize:
        assert_close(w.sum(-1), torch.full((t,), 2.5), 1e-5, "renormalized sum")


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("z", [0, 3])
def test_softmax_grouped_by_best_expert_deepseek_v2(gen, t, z):
    """DeepSeek-V2's group_limited_greedy: softmax over all experts, the topk_group groups with the best single
    score, top-k inside them, no renormalization, scaled; the same sets and weights as transformers' router."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    e, k = 32, 6
    logits = torch.randn(t, e + z, generator=gen) * 2
    w, i = _compare(logits.to(DEVICE), k, renormalize=False, n_group=8, topk_group=3, routed_scaling_factor=16.0,
                    group_score="max", num_zero=z)
    groups = i.cpu().long()
    for row in groups:
        real = row[row < e]
        assert len(set((real // 4).tolist())) <= 3, f"experts from more than topk_group groups: {row.tolist()}"
    if z:
        return
    cfg = DeepseekV2Config(hidden_size=e, n_routed_experts=e, num_experts_per_tok=k, n_group=8, topk_group=3,
                           topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    hf = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.copy_(torch.eye(e))  # router logits = the input
        _, w_hf, i_hf = hf(logits)
    order = i_hf.long().sort(dim=-1)
    assert torch.equal(i.cpu().long().sort(dim=-1).values, order.values)
    assert_close(w.cpu().gather(1, i.cpu().long().sort(dim=-1).indices), w_hf.gather(1, order.indices), 1e-6,
                 "weights against transformers' router")


@pytest.mark.parametrize("t", [1, 33])
def test_sigmoid_bias_no_groups_glm(gen, t):
    e = 24
    logits = torch.randn(t, e, generator=gen).to(DEVICE)
    bias = torch.randn(e, generator=gen).to(DEVICE)  # large enough to change the selection
    _compare(logits, 4, renormalize=True, scoring="sigmoid", correction_bias=bias, routed_scaling_factor=1.8)


@pytest.mark.parametrize("t", [7])
def test_softmax_with_bias_and_zero_experts_longcat(gen, t):
    # 12 real + 4 zero experts routed together; the bias steers selection, weights are unbiased.
    logits = torch.randn(t, 16, generator=gen).to(DEVICE)
    bias = (0.05 * torch.randn(16, generator=gen)).to(DEVICE)
    _compare(logits, 4, renormalize=False, correction_bias=bias, routed_scaling_factor=6.0)


@pytest.mark.parametrize("t", [1, 7, 33])
def test_grouped_routing_leaves_zero_experts_out_of_the_groups(gen, t):
    # 16 real experts in 4 groups (best 1 group) + 3 zero experts that are always eligible
    e, z = 16, 3
    logits = torch.randn(t, e + z, generator=gen)
    logits[:, e:] += torch.linspace(-2, 2, t)[:, None]  # from rarely to mostly chosen
    bias = (0.1 * torch.randn(e + z, generator=gen))
    w, i = _compare(logits.to(DEVICE), 4, renormalize=True, scoring="sigmoid", correction_bias=bias.to(DEVICE),
                    n_group=4, topk_group=1, routed_scaling_factor=2.5, num_zero=z)
    ids = i.cpu().long()
    for row in ids:
        real = row[row < e]
        assert len(set((real // 4).tolist())) <= 1, f"real experts from more than one group: {row.tolist()}"
    if t == 33:
        assert (ids >= e).any() and (ids < e).any(), "the case should mix zero and real slots"


def test_all_zero_experts_chosen(gen):
    logits = torch.randn(5, 10, generator=gen)
    logits[:, 8], logits[:, 9] = 50.0, 49.0  # distinct: torch.topk leaves ties unordered
    w, i = _compare(logits.to(DEVICE), 2, renormalize=True, num_zero=2)
    assert (i.cpu() >= 8).all()


def test_bias_changes_selection_but_not_weights(gen):
    logits = torch.randn(5, 8, generator=gen).to(DEVICE)
    bias = torch.zeros(8)
    bias[7] = 100.0  # expert 7 always chosen, with its unbiased sigmoid score as weight
    w, i = route(logits, 2, renormalize=False, scoring="sigmoid", correction_bias=bias.to(DEVICE))
    assert (i[:, 0].cpu() == 7).all()
    assert_close(w[:, 0], logits[:, 7].float().sigmoid(), 1e-6, "unbiased weight")


def test_empty_and_errors():
    w, i = route(torch.zeros(0, 8, device=DEVICE), 2, renormalize=True)
    assert w.shape == (0, 2) and i.shape == (0, 2)
    with pytest.raises(ValueError):
        route(torch.zeros(3, 8, device=DEVICE), 9, renormalize=True)
    with pytest.raises(ValueError):
        route(torch.zeros(3, 8, device=DEVICE), 2, renormalize=True, n_group=3, topk_group=1)
    with pytest.raises(ValueError):
        route(torch.zeros(3, 8, device=DEVICE), 2, renormalize=True, scoring="tanh")
