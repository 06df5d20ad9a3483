"""The one-token CPU decode attention (runtime.attention) against the transformers module it wraps."""

from __future__ import annotations

import pytest
import torch

from moecompress.runtime import Runtime
from moecompress.runtime.attention import DecodeAttention, RotaryMatrix, decode_layer
from moecompress.runtime.cache import KVCache

STANDARD = {"qwen3_moe": "head", "qwen2_moe": None, "mixtral": None, "olmoe": "full"}
OTHERS = ["deepseek_v3", "glm4_moe", "qwen3_5_moe", "glm4_moe_lite", "qwen3_next"]  # latent, partial-rotary, gated attention


def _fast_layers(rt):
    return [layer.self_attn for layer in rt.model.layers if isinstance(getattr(layer, "self_attn", None), DecodeAttention)]


@pytest.mark.parametrize("family", list(STANDARD))
def test_standard_attention_takes_the_fast_path(tiny_ckpt, family):
    rt = Runtime.load(tiny_ckpt(family))
    fast = _fast_layers(rt)
    assert len(fast) == len(rt.model.layers) and rt.report.fast_attention == len(fast)
    assert {a.norm for a in fast} == {STANDARD[family]}
    a = fast[0]
    # the projections read views of the fused matrices: the weights are stored once
    for name in ("q_proj", "k_proj", "v_proj"):
        assert getattr(a.inner, name).weight.untyped_storage().data_ptr() == a.qkv.w.untyped_storage().data_ptr()
    assert a.inner.o_proj.weight.untyped_storage().data_ptr() == a.o.w.untyped_storage().data_ptr()


    assert all(f is not None for f in rt.model.fast)  # decode steps skip the decoder layers' own forward


@pytest.mark.parametrize("family", OTHERS)
def test_other_attention_keeps_transformers(tiny_ckpt, family):
    rt = Runtime.load(tiny_ckpt(family))
    assert _fast_layers(rt) == [] and rt.report.fast_attention == 0
    assert rt.model.fast == [None] * len(rt.model.layers)


def test_a_layer_that_is_not_the_plain_residual_block_keeps_its_forward(tiny_ckpt):
    rt = Runtime.load(tiny_ckpt("qwen3_moe"))
    layer, rotary = rt.model.layers[0], rt.model.lm.model.rotary_emb
    assert decode_layer(layer, rotary) is not None
    plain = layer.forward
    layer.forward = lambda *a, **k: plain(*a, **k) * 1.5  # what a family with a scaled residual would do
    assert decode_layer(layer, rotary) is None


@pytest.mark.parametrize("family,overrides", [("qwen3_moe", {}), ("qwen2_moe", {}), ("mixtral", {}), ("olmoe", {}),
                                              ("olmoe", {"clip_qkv": 0.5})])
def test_decode_steps_match_the_wrapped_module(tiny_ckpt, family, overrides):
    """Ten decode steps on two batch rows after a 5-token prefill: every step's output and the cache contents
    equal transformers' to rounding."""
    rt = Runtime.load(tiny_ckpt(family, **overrides))
    _check_decode_steps(rt, _fast_layers(rt)[-1])


# packed CPU projections: int4 (one fused kernel call for q/k/v), int8 with a q/k/v bias (three calls), asym g64,
# int8 in groups beside int4 experts (--override; fused: one loop over the groups of the concatenation)
PACKED = [("qwen3_moe", {}, True), ("qwen2_moe", {"bits": 8, "format": "gptq"}, False),
          ("olmoe", {"symmetric": False, "group_size": 64}, True),
          ("qwen3_moe", {"overrides": ["self_attn=8"], "group_size": 32}, True),
          ("qwen3_moe", {"bits": 8, "symmetric": False, "group_size": 32}, True)]  # zero points: int8group too


@pytest.mark.parametrize("family,settings,fused", PACKED)
def test_packed_projections_take_the_fast_path(tiny_ckpt, tmp_path, family, settings, fused):
    from conftest import quick_config
    from moecompress.pipeline import quantize

    q = tmp_path / "q"
    quantize(tiny_ckpt(family), q, quick_config(**{"bits": 4, "format": "compressed-tensors", "method": "rtn",
                                                   **settings}))
    rt = Runtime.load(q)  # --cpu-weights packed
    fast = _fast_layers(rt)
    assert len(fast) == len(rt.model.layers) and all(f is not None for f in rt.model.fast)
    attn = fast[-1]
    assert attn.qkv.fused == fused
    if settings.get("overrides") or settings.get("bits") == 8 and not settings.get("symmetric", True):
        assert attn.qkv.kind == "int8group" and attn.o.direct
        assert (attn.qkv.zd is None) == settings.get("symmetric", True)
    if fused:  # the projections' packed rows are views of the concatenation: stored once
        for name in ("q_proj", "k_proj", "v_proj"):
            ptr = getattr(attn.inner, name).packed.untyped_storage().data_ptr()
            assert ptr == attn.qkv.packed.untyped_storage().data_ptr()
    _check_decode_steps(rt, attn)


def _check_decode_steps(rt, attn):
    rotary = rt.model.lm.model.rotary_emb
    h = attn.hidden
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 15, h, generator=gen) * 2
    pos = torch.arange(15)
    cos, sin = rotary(x, pos[None].expand(2, -1))
    caches = [KVCache(attn.layer_idx + 1, 2, 16) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            cache.prepare(pos[:5], 5)
            attn.inner(x[:, :5], position_embeddings=(cos[:, :5], sin[:, :5]), attention_mask=None,
                       past_key_values=cache)
        for t in range(5, 15):
            pe = (cos[:, t:t + 1], sin[:, t:t + 1])
            for cache in caches:
                cache.prepare(pos[t:t + 1], t + 1)
            ref = attn.inner(x[:, t:t + 1], position_embeddings=pe, attention_mask=None, past_key_values=caches[0])[0]
            ours, none = attn(x[:, t:t + 1], position_embeddings=pe, attention_mask=None, past_key_values=caches[1])
            assert none is None
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].keys[attn.layer_idx], caches[0].keys[attn.layer_idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].values[attn.layer_idx], caches[0].values[attn.layer_idx])


def test_prefill_and_masked_steps_go_to_transformers(tiny_ckpt, monkeypatch):
    rt = Runtime.load(tiny_ckpt("qwen3_moe"))
    attn = _fast_layers(rt)[0]
    calls = []
    monkeypatch.setattr(attn, "decode", lambda *a: calls.append(a) or torch.zeros(1, 1, attn.hidden))
    x = torch.randn(1, 3, attn.hidden)
    cos, sin = rt.model.lm.model.rotary_emb(x, torch.arange(3)[None])
    cache = KVCache(attn.layer_idx + 1, 1, 8)
    with torch.no_grad():
        cache.prepare(torch.arange(3), 3)
        attn(x, position_embeddings=(cos, sin), attention_mask=None, past_key_values=cache)  # prefill
        cache.prepare(torch.arange(2, 3), 3)
        mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
        attn(x[:, 2:], position_embeddings=(cos[:, 2:], sin[:, 2:]), attention_mask=mask, past_key_values=cache)
        cache.prepare(torch.arange(2, 3), None)  # a graph step: the position lives on the device
        attn(x[:, 2:], position_embeddings=(cos[:, 2:], sin[:, 2:]), attention_mask=None, past_key_values=cache)
    assert calls == []


def test_rotary_matrix_is_rotate_half(gen):
    d, b = 64, 3
    ang = torch.rand(b, 1, d // 2, generator=gen) * 10
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x = torch.randn(b, 5, d, generator=gen)
    ref = x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin
    m = RotaryMatrix()
    torch.testing.assert_close(torch.bmm(x, m(cos, sin)), ref, rtol=1e-6, atol=1e-6)
    assert m(cos, sin) is m(cos, sin)  # once per step (same sin tensor)


def test_rowmajor_linears_keeps_values_and_tied_weights(gen):
    from torch import nn

    from moecompress.runtime.convert import rowmajor_linears

    model = nn.ModuleDict({"emb": nn.Embedding(10, 6), "proj": nn.Linear(6, 4), "head": nn.Linear(6, 10, bias=False)})
    model["head"].weight = model["emb"].weight  # tied
    x = torch.randn(3, 6, generator=gen)
    before = model["proj"](x)
    assert rowmajor_linears(model) == 1
    assert model["proj"].weight.stride() == (1, 4) and model["head"].weight is model["emb"].weight
    assert torch.equal(model["proj"](x), before)


def test_rotary_matrix_follows_the_steps_dtype(gen):
    m = RotaryMatrix()
    cos, sin = torch.rand(1, 1, 64, generator=gen), torch.rand(1, 1, 64, generator=gen)
    assert m(cos, sin).dtype == torch.float32
    assert m(cos.bfloat16(), sin.bfloat16()).dtype == torch.bfloat16


def test_bf16_packed_run_decodes(tiny_ckpt, tmp_path):
    """A bf16 CPU run of a packed checkpoint (the probes run in bf16 too): decoding works, and its greedy
    tokens follow the fp32 run's for the first steps."""
    from conftest import quick_config
    from moecompress.pipeline import quantize

    q = tmp_path / "q"
    quantize(tiny_ckpt("mixtral"), q, quick_config(bits=4, format="compressed-tensors", method="rtn"))
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    ours = Runtime.load(q, dtype="bfloat16").generate(prompt, 8, stop_ids=[])
    ref = Runtime.load(q).generate(prompt, 8, stop_ids=[])
    assert len(ours.tokens[0]) == 8 and ours.tokens[0][:2] == ref.tokens[0][:2]
