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


def test_linears_reading_one_input_share_one_accumulation(tiny_ckpt):
    """q/k/v read the very same normed tensor: one Gram is built, the others are bit-equal copies, and it is
    the Gram of that input."""
    handle = ModelHandle.open(tiny_ckpt("qwen3_moe"))
    layer = handle.load_layer(handle.skeleton(), 0, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 7, handle.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    seen = {}
    def spy(module, args):  # returns None: the input stays the same object
        seen["x"] = args[0].detach().clone()

    spy = layer.self_attn.q_proj.register_forward_pre_hook(spy)
    pos = torch.arange(7)[None].expand(2, -1)
    kw = dict(position_embeddings=layer_rotary(handle, x, pos), attention_mask=None, position_ids=pos)
    with HessianCapture(layer, {n: None for n in names}, abs_sums=False) as cap:
        layer.self_attn(layer.input_layernorm(x), **kw)
    spy.remove()
    assert cap.shared == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj"}
    q = cap.stats["self_attn.q_proj"]
    for n in names[1:3]:
        assert cap.stats[n] is not q and torch.equal(cap.stats[n].sums, q.sums) and torch.equal(cap.stats[n].counts, q.counts)
    assert not torch.equal(cap.stats["self_attn.o_proj"].sums[:4], q.sums[:4])  # o_proj reads its own input
    xs = seen["x"].reshape(-1, x.shape[-1])
    torch.testing.assert_close(q.hessian(), 2.0 * xs.T @ xs / xs.shape[0], rtol=1e-5, atol=1e-6)
    assert "abs_sums" not in q.extra  # GPTQ's capture skips AWQ's statistic


def layer_rotary(handle, x, pos):
    """The family's rotary (cos, sin) for positions ``pos`` (its tables rebuilt off the meta device)."""
    rot = type(handle.skeleton().model.rotary_emb)(config=handle.text_config)
    return rot(x, pos)


@pytest.mark.parametrize("m", [1, 63, 64, 65, 200])
def test_gathered_rows_are_padded_with_zero_rows_to_the_block(m):
    """The per-expert GEMMs see row counts rounded up to ``ROW_BLOCK``: the routed rows first, then zeros (which
    add nothing to a Gram matrix)."""
    from moecompress.calib.capture import ROW_BLOCK, gather_rows

    x = torch.randn(300, 8, requires_grad=True)
    index = torch.randperm(300)[:m]
    got = gather_rows(x, index)
    assert got.shape == (-(-m // ROW_BLOCK) * ROW_BLOCK, 8) and not got.requires_grad
    assert torch.equal(got[:m], x.detach()[index]) and not got[m:].any()
    from moecompress.calib.capture import pad_rows

    assert pad_rows(got[:m]).shape == got.shape and torch.equal(pad_rows(got[:m]), got)
    assert pad_rows(got) is got
    w = gather_rows(torch.rand(300), index)  # 1-D (routing weights)
    assert w.shape == (got.shape[0],) and not w[m:].any()
    torch.testing.assert_close(got.T @ got, x.detach()[index].T @ x.detach()[index], rtol=1e-5, atol=1e-5)
