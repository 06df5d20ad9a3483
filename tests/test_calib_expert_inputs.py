"""ExpertInputs: the down projections' inputs kept from their capture reproduce the experts' forward."""

import logging

import pytest
import torch

from moecompress.arch.handle import ModelHandle, decoder_layers
from moecompress.calib.capture import HessianCapture
from moecompress.calib.expert_inputs import ExpertInputs
from moecompress.calib.runner import mlp_half
from moecompress.quant.targets import capture_spec, layer_targets

from conftest import FAMILIES


def _layer_and_down(tiny_ckpt, family):
    handle = ModelHandle.open(tiny_ckpt(family))
    model = handle.skeleton()
    i = next(i for i, layer in enumerate(decoder_layers(model))  # the first MoE layer (some start dense)
             if any(t.expert_proj == "down" for t in layer_targets(layer, handle.spec, False)))
    layer = handle.load_layer(model, i, torch.device("cpu"), torch.float32)
    down = next(t for t in layer_targets(layer, handle.spec, False) if t.expert_proj == "down")
    return handle, layer, down


def _capture(layer, down, mids, keep):
    with HessianCapture(layer, {down.name: capture_spec(down)}, skip_expert_outputs=True, keep=keep) as cap:
        mlp_half(layer, mids)
    keep.assign(list(range(len(mids))))
    return cap.stats


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_feed_equals_the_layers_own(tiny_ckpt, family, caplog):
    handle, layer, down = _layer_and_down(tiny_ckpt, family)
    g = torch.Generator().manual_seed(0)
    mids = [torch.randn(2, 9, handle.text_config.hidden_size, generator=g) for _ in range(3)]
    keep = ExpertInputs()
    _capture(layer, down, mids, keep)
    assert keep.covers(range(3)) and keep.nbytes > 0
    want = mlp_half(layer, mids)
    with caplog.at_level(logging.INFO, logger="moecompress"), keep.replay([0, 1, 2]):
        got = mlp_half(layer, mids)
    assert "do not reproduce" not in caplog.text  # the kept activations were used, not the forward
    assert "forward" not in vars(layer.get_submodule(down.module_name))  # restored
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_activations_that_do_not_reproduce_the_forward_fall_back_to_it(tiny_ckpt, caplog):
    handle, layer, down = _layer_and_down(tiny_ckpt, "qwen3_moe")
    mids = [torch.randn(2, 9, handle.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
            for _ in range(2)]
    keep = ExpertInputs()
    _capture(layer, down, mids, keep)
    for _, per_expert in keep.batches.values():
        for _, act in per_expert.values():
            act.mul_(2.0)  # what a family whose experts compute otherwise would give
    want = mlp_half(layer, mids)
    with caplog.at_level(logging.INFO, logger="moecompress"), keep.replay([0, 1]):
        got = mlp_half(layer, mids)
    assert "do not reproduce" in caplog.text
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_over_the_budget_nothing_is_kept(tiny_ckpt):
    handle, layer, down = _layer_and_down(tiny_ckpt, "qwen3_moe")
    mids = [torch.randn(2, 9, handle.text_config.hidden_size) for _ in range(2)]
    small = ExpertInputs(budget=1000)
    _capture(layer, down, mids, small)
    assert small.full and not small.covers([0, 1]) and not small.batches


def test_half_precision_replay_is_accepted_within_its_rounding(tiny_ckpt, caplog):
    """bf16 calibration (the GPU default): the replay differs from the forward by bf16 rounding only, which
    must not count as a different formula."""
    handle, layer, down = _layer_and_down(tiny_ckpt, "qwen3_moe")
    layer = layer.to(torch.bfloat16)
    mids = [torch.randn(2, 9, handle.text_config.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
            for _ in range(2)]
    keep = ExpertInputs()
    _capture(layer, down, mids, keep)
    want = mlp_half(layer, mids)
    with caplog.at_level(logging.INFO, logger="moecompress"), keep.replay([0, 1]):
        got = mlp_half(layer, mids)
    assert "do not reproduce" not in caplog.text
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
