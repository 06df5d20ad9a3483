"""HessianCapture: per-expert Gram matrices of the routed tokens, optionally weighted by squared routing weight."""

import pytest
import torch

from moecompress.arch.handle import ModelHandle
from moecompress.calib.capture import ExpertTarget, HessianCapture, _experts_args


@pytest.mark.parametrize("weighted", [False, True])
def test_expert_hessians_match_a_direct_computation(tiny_ckpt, weighted):
    handle = ModelHandle.open(tiny_ckpt("qwen3_moe"))
    model = handle.skeleton()
    layer = handle.load_layer(model, 0, torch.device("cpu"), torch.float32)
    experts = layer.mlp.experts
    seen = {}

    def spy(module, args, kwargs):  # what the experts module is called with
        seen["args"] = (args, kwargs)

    h = experts.register_forward_pre_hook(spy, with_kwargs=True)
    x = torch.randn(2, 9, handle.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with HessianCapture(layer, {"mlp.experts.gate_up_proj": ExpertTarget("gate_up", weight_by_routing=weighted)}) as cap:
        layer.mlp(x)
    h.remove()
    hidden, idx, w = _experts_args(*seen["args"])  # (hidden, top_k_index, top_k_weights) as called
    hidden = hidden.reshape(-1, hidden.shape[-1])
    st = cap.stats["mlp.experts.gate_up_proj"]
    H = st.hessian()
    for e in range(experts.gate_up_proj.shape[0]):
        rows, slots = (idx == e).nonzero(as_tuple=True)
        xe = hidden[rows]
        if weighted:
            xe = xe * w[rows, slots, None]
        expect = 2.0 * xe.T @ xe / max(len(rows), 1)
        assert int(st.counts[e]) == len(rows)
        torch.testing.assert_close(H[e], expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proj", ["gate_up", "down"])
def test_skipping_expert_outputs_keeps_the_statistics_and_restores_forward(tiny_ckpt, proj):
    handle = ModelHandle.open(tiny_ckpt("qwen2_moe"))  # shared expert too: its hooks must still fire
    layer = handle.load_layer(handle.skeleton(), 0, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 11, handle.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    targets = {f"mlp.experts.{proj}_proj": ExpertTarget(proj, weight_by_routing=True),
               "mlp.shared_expert.up_proj": None}
    stats = {}
    for skip in (False, True):
        with HessianCapture(layer, targets, skip_expert_outputs=skip) as cap:
            layer.mlp(x)
        stats[skip] = cap.stats
        assert "forward" not in vars(layer.mlp.experts)
    for name in targets:
        torch.testing.assert_close(stats[True][name].sums, stats[False][name].sums, rtol=0, atol=0)
        assert torch.equal(stats[True][name].counts, stats[False][name].counts)
    with HessianCapture(layer, targets, skip_expert_outputs=True):
        skipped = layer.mlp(x)
    shared_only = layer.mlp.shared_expert(x) * torch.sigmoid(layer.mlp.shared_expert_gate(x))
    torch.testing.assert_close(skipped, shared_only)  # the routed experts contributed nothing
    assert not torch.allclose(layer.mlp(x), shared_only)  # outside the context they compute again
