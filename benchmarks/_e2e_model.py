"""The bytes model of benchmarks/e2e_decode.py: model shapes, and what one decode step must read.

Kept apart from the driver so that the arithmetic (tested by hand in tests/test_e2e_decode_bench.py)
reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: dict[str, dict] = {
    # Qwen3-30B-A3B (config.json of the release); the real model has 48 layers
    "qwen3-30b-a3b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # every K a multiple of 128 so that group 128 applies everywhere
    "tiny": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
                 moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                 vocab_size=260, max_position_embeddings=4096, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    experts: int
    top_k: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, shape: str, layers: int) -> "Dims":
        s = SHAPES[shape]
        return cls(s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"],
                   s["moe_intermediate_size"], s["num_experts"], s["num_experts_per_tok"], s["vocab_size"], layers)


@dataclass(frozen=True)
class WeightFormat:
    """How the runtime holds a linear: float at ``float_bytes``/element, or ``bits``-bit codes + scales."""

    float_bytes: int
    bits: int | None = None  # None: float
    group_size: int = 128
    scale_bytes: int = 2

    def linear(self, n: int, k: int) -> int:
        """Bytes of an ``[N, K]`` weight."""
        if self.bits is None:
            return n * k * self.float_bytes
        return n * k * self.bits // 8 + n * (k // self.group_size) * self.scale_bytes


def step_bytes(d: Dims, fmt: WeightFormat, batch: int, experts_hit_per_layer: float, kv_len: float) -> dict:
    """Bytes one decode step must read (see e2e_decode.py's docstring), by part; ``total`` is their sum."""
    fb = fmt.float_bytes
    h, q, kv = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim
    attn = fmt.linear(q, h) + 2 * fmt.linear(kv, h) + fmt.linear(h, q)
    parts = {
        "embed_rows": batch * h * fb,
        "attention": d.layers * attn,
        "norms": d.layers * (2 * h + 2 * d.head_dim) * fb,
        "router": d.layers * d.experts * h * 4,  # fp32 in the runtime
        "experts": d.layers * experts_hit_per_layer * (fmt.linear(2 * d.inter, h) + fmt.linear(h, d.inter)),
        "kv_cache": d.layers * 2 * batch * kv * kv_len * fb,
        "final_norm": h * fb,
        "lm_head": d.vocab * h * fb,
    }
    parts["total"] = sum(parts.values())
    return parts


def layer_weight_bytes(d: Dims, fmt: WeightFormat) -> dict:
    """Per layer: attention linears + q/k norms, one routed expert, the router -- as step_bytes counts them."""
    h, q, kv = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim
    return {
        "attention": fmt.linear(q, h) + 2 * fmt.linear(kv, h) + fmt.linear(h, q) + 2 * d.head_dim * fmt.float_bytes,
        "expert": fmt.linear(2 * d.inter, h) + fmt.linear(h, d.inter),
        "router": d.experts * h * 4,
    }


def held_weight_bytes(rt) -> dict:
    """The same three quantities read off the tensors the loaded runtime holds (mean over layers)."""
    def nbytes(m) -> int:  # each storage once: the CPU fast attention's projections are views of one matrix
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(m.parameters()) + list(m.buffers())}
        return sum(storages.values())

    def attention(lay):  # transformers' module (runtime.attention wraps it on the CPU; its weights are views
        return getattr(lay.self_attn, "inner", lay.self_attn)  # of the wrapper's, plus stacked q/k norm weights)

    layers = rt.model.layers
    return {
        "attention": sum(nbytes(attention(lay)) for lay in layers) / len(layers),
        "expert": sum(nbytes(lay.mlp.experts) / lay.mlp.experts.num_experts for lay in layers) / len(layers),
        "router": sum(lay.mlp.router_weight.nbytes for lay in layers) / len(layers),
    }


def expected_unique_experts(experts: int, top_k: int, batch: int) -> float:
    """Distinct experts hit by ``batch`` tokens each picking ``top_k`` uniformly at random."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)
