"""Peak memory of `quantize` is O(one decoder layer): quantize a model with N and 2N big layers.

Builds Qwen3-MoE-shaped checkpoints whose decoder layers each hold >= 100 MB (bf16 on disk), runs
GPTQ on each in a fresh process, and prints the peak resident memory (ru_maxrss) side by side.
Doubling the layers must not grow the peak by more than ~1.5 layers' worth.

    python benchmarks/stream_memory.py [--layers 2] [--experts 32] [--hidden 1024] [--moe-inter 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from moecompress.pipeline import quantize
from moecompress.settings import build_config
cfg = build_config(method=sys.argv[3], bits=4, group_size=128, calib_samples=4, seq_len=128, batch_size=4)
t = time.perf_counter()
quantize(sys.argv[1], sys.argv[2], cfg)
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - t}))
"""


def build(path: Path, layers: int, args) -> int:
    """Write a random bf16 checkpoint layer by layer; return the bytes of one decoder layer."""
    import torch
    from transformers import AutoConfig

    from moecompress.checkpoint.writer import ShardedWriter
    from moecompress.tiny import byte_tokenizer

    cfg = AutoConfig.for_model(
        "qwen3_moe", hidden_size=args.hidden, intermediate_size=args.hidden * 2, moe_intermediate_size=args.moe_inter,
        num_hidden_layers=layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4, head_dim=64,
        num_experts=args.experts, num_experts_per_tok=4, vocab_size=260, tie_word_embeddings=False,
        norm_topk_prob=True, dtype="bfloat16")
    path.mkdir(parents=True)
    w = ShardedWriter(path, max_shard_bytes=512 << 20)
    g = torch.Generator().manual_seed(0)
    h, i, e = args.hidden, args.moe_inter, args.experts

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    layer_bytes = 0
    for n in range(layers):
        p = f"model.layers.{n}."
        tensors = {
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(256, h),
            p + "self_attn.v_proj.weight": rnd(256, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "self_attn.q_norm.weight": torch.ones(64, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(64, dtype=torch.bfloat16),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rnd(e, h, std=0.1),
        }
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            tensors.update({q + "gate_proj.weight": rnd(i, h), q + "up_proj.weight": rnd(i, h),
                            q + "down_proj.weight": rnd(h, i)})
        for k, v in tensors.items():
            w.add(k, v)
        layer_bytes = sum(v.numel() * v.element_size() for v in tensors.values())
        w.flush()
    w.add("model.embed_tokens.weight", rnd(260, h))
    w.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    w.add("lm_head.weight", rnd(260, h))
    w.close()
    cfg.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return layer_bytes


def run(src: Path, out: Path, method: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), method], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-inter", type=int, default=512)
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.layers, 2 * args.layers):
            src = Path(tmp) / f"m{n}"
            t = time.perf_counter()
            layer_bytes = build(src, n, args)
            build_s = time.perf_counter() - t
            r = run(src, Path(tmp) / f"q{n}", args.method)
            rows.append((n, layer_bytes, r["peak_rss"], r["seconds"], build_s))
    mb = 2**20
    print(f"{'layers':>6} {'layer MB':>9} {'peak RSS MB':>12} {'quantize s':>11}")
    for n, lb, rss, s, _ in rows:
        print(f"{n:>6} {lb / mb:>9.1f} {rss / mb:>12.1f} {s:>11.1f}")
    growth = (rows[1][2] - rows[0][2]) / rows[0][1]
    print(f"peak growth from {rows[0][0]} to {rows[1][0]} layers: {(rows[1][2] - rows[0][2]) / mb:.1f} MB "
          f"= {growth:.2f} layers' worth (target <= 1.5)")
    sys.exit(0 if growth <= 1.5 else 1)


if __name__ == "__main__":
    main()
