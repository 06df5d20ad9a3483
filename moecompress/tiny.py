"""Tiny checkpoints of every supported family, built in code (tests, benchmarks, the demo).

Nothing is downloaded: the configs are small versions of the real ones, the weights are random
(seeded), and the tokenizer is a byte-level one made on the spot. ``save_tiny`` writes what
``save_pretrained`` writes, or the fused-3D expert layout of official Qwen3.5/3.6 checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BYTE_VOCAB = 256 + 4  # the 256 bytes and a few specials

_COMMON = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=BYTE_VOCAB,
               max_position_embeddings=512, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(_COMMON, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(_COMMON, intermediate_size=256, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(_COMMON, intermediate_size=64, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, intermediate_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                  eos_token_id=None, pad_token_id=None, bos_token_id=None),
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=64, kv_lora_rank=64,
                        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.5,
                        topk_method="noaux_tc", scoring_func="sigmoid"),  # the releases' fields, which vLLM reads
    # DeepSeek-V3.2: V3 with the DSA indexer (index_topk 16: the tests' prompts go past it; 16 indexer heads, so
    # that a key's score is practically never exactly 0, where top-k ties would make eager and graph steps differ)
    "deepseek_v32": dict(_COMMON, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=64,
                         num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                         first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=64, kv_lora_rank=64,
                         qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.5,
                         index_topk=16, index_n_heads=16, index_head_dim=64, topk_method="noaux_tc",
                         scoring_func="sigmoid"),
    # GLM-5's proportions (v_head_dim != qk head dim, q LoRA), DSA with index_topk 16 like deepseek_v32
    "glm_moe_dsa": dict(_COMMON, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                        first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=64, kv_lora_rank=64,
                        qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=64, routed_scaling_factor=2.5,
                        index_topk=16, index_n_heads=16, index_head_dim=64, topk_method="noaux_tc",
                        scoring_func="sigmoid"),
    # DeepSeek-V2-Lite's proportions: no q LoRA, greedy top-k, no renormalization, two shared experts
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                        n_shared_experts=2, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=32, topk_method="greedy", norm_topk_prob=False),
    "dots1": dict(_COMMON, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                  n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    # every layer sliding but the last (sliding_window 8, shorter than the tests' prompts)
    "exaone_moe": dict(_COMMON, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                       num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                       num_shared_experts=1, routed_scaling_factor=2.5, sliding_window=8,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # ERNIE-4.5-21B-A3B's proportions; its selection bias is randomized below like the sigmoid routers'
    "ernie4_5_moe": dict(_COMMON, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                         moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                         moe_layer_end_index=2, moe_layer_interval=1, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None),
    # MiniMax-M2's proportions: partial rotary (rotary_dim 16 of head_dim 32), q/k norms over whole projections
    "minimax_m2": dict(_COMMON, head_dim=32, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                       num_experts_per_tok=2, rotary_dim=16, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                       scoring_func="sigmoid", use_routing_bias=True),  # the releases' fields (vLLM reads them)
    "glm4_moe": dict(_COMMON, head_dim=32, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                     n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                     n_shared_experts=1, routed_scaling_factor=2.5),
    # GLM-4.7-Flash's proportions (qk_nope + qk_rope = v_head_dim); mlp_layer_types defaults to layer 0 dense
    "glm4_moe_lite": dict(_COMMON, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=64,
                          num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                          n_shared_experts=1, q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16,
                          qk_nope_head_dim=48, v_head_dim=64, routed_scaling_factor=1.8),
    "qwen3_5_moe": dict(_COMMON, head_dim=32, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, linear_key_head_dim=32,
                        linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4),
    "qwen3_next": dict(_COMMON, head_dim=32, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                       num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, linear_key_head_dim=32,
                       linear_value_head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4),
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token (vocab 256 + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|startoftext|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")
    return fast


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kw = dict(TINY_CONFIGS[family], **overrides)
    if family == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe import Qwen3_5MoeConfig

        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=kw["hidden_size"])
        return Qwen3_5MoeConfig(text_config=kw, vision_config=vision, tie_word_embeddings=False)
    return AutoConfig.for_model(family, **kw)


def build_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny model of ``family`` (routers made non-degenerate)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cls = AutoModelForImageTextToText if family == "qwen3_5_moe" else AutoModelForCausalLM
    model = cls.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # transformers initialises routers and correction biases to zero: random ones route for real
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
        for name, b in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model.eval()


def save_tiny(family: str, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
              fused_experts: bool = False, original_format: bool = True, **overrides) -> Path:
    """Write a tiny checkpoint (config, safetensors, byte tokenizer) and return its path.

    ``original_format=False`` saves transformers 5's in-memory names (``save_original_format=False``:
    ``mlp.`` for every family, experts fused to 3D) instead of the family's original ones.
    """
    path = Path(path)
    model = build_tiny(family, seed, dtype, **overrides)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path, save_original_format=original_format)
    byte_tokenizer().save_pretrained(path)
    if fused_experts:
        _fuse_experts_on_disk(path)
    return path


def _fuse_experts_on_disk(path: Path) -> None:
    """Rewrite per-expert tensors as fused 3D ``experts.gate_up_proj``/``down_proj`` (official Qwen3.5 layout)."""
    import re

    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, "tiny checkpoints are single-shard"
    sd = load_file(files[0])
    pat = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for k in list(sd):
        m = pat.match(k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = sd.pop(k)
    for base, projs in groups.items():
        n = len(projs["down_proj"])
        sd[f"{base}.gate_up_proj"] = torch.stack([torch.cat([projs["gate_proj"][e], projs["up_proj"][e]]) for e in range(n)])
        sd[f"{base}.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(n)])
    save_file(sd, files[0], metadata={"format": "pt"})
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        data = json.loads(idx.read_text())
        data["weight_map"] = {k: files[0].name for k in sd}
        idx.write_text(json.dumps(data, indent=2))


def save_fp8(src: str | Path, dst: str | Path, block: tuple[int, int] | None = (128, 128),
             layout: str = "fp8") -> Path:
    """Write ``src`` (a float checkpoint) as an FP8 release would be: the decoder's linear and expert weights
    in e4m3 with their scales, routers, norms, embeddings and the head in float (``quant.formats.fp8``).

    ``layout="fp8"``: DeepSeek's / transformers' fine-grained FP8 (``weight_scale_inv`` per ``block``, None: per
    tensor); ``"compressed-tensors"``: float-quantized with ``weight_scale`` per block (or per tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from .quant.formats import fp8

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    suffix = "_scale_inv" if layout == "fp8" else "_scale"
    weight_map = {}
    for f in sorted(dst.glob("*.safetensors")):
        sd, out = load_file(f), {}
        for name, t in sd.items():
            layer_linear = ".layers." in name and t.dim() >= 2 and t.is_floating_point() and not any(
                x in name for x in ("norm", ".gate.weight", "router", "visual"))
            if layer_linear:
                out[name], out[name + suffix] = fp8.quantize(t, block)
            else:
                out[name] = t
        save_file(out, f, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((dst / "config.json").read_text())
    if layout == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(block) if block else None}
    else:
        strategy = {"strategy": "block", "block_structure": list(block)} if block else {"strategy": "tensor"}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(
                num_bits=8, type="float", symmetric=True, dynamic=False, **strategy)}},
            "ignore": ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
