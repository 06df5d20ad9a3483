"""Peak memory and time per step of block-output tuning (``quantize --tune-steps``) on one MoE block.

Each mode runs in its own process (peak RSS from ``VmHWM``; with ``--device cuda``, bf16 on the GPU, the peak of
allocated GPU memory from the point the block is quantized): ``none`` builds the block, its inputs and
targets and quantizes it (RTN) but does not tune: the baseline; ``tune`` runs ``quant.tune.tune_codes`` for
``--steps`` steps; ``twin`` the same with the weights built by ``quant.tune._weight`` (torch's autograd
keeps its intermediates, as the tuning did before session 25) instead of ``_TunedWeight``. The extra peak over the baseline, in units of the block's weights at 2 bytes each (bf16),
is what the tuning costs. Shapes default to a Qwen3-30B-A3B MoE block with fewer experts (hidden 2048,
expert intermediate 768, top-8 of ``--experts``)::

    python benchmarks/tune_memory.py --experts 32 --tokens 1024 --steps 4
    python benchmarks/tune_memory.py --device cuda --experts 128 --tokens 4096 --steps 8   # a whole Qwen3-30B-A3B block
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def child(args) -> dict:
    import torch
    from torch.func import functional_call

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _child_util import vm_hwm

    from moecompress.calib.runner import layer_output
    from moecompress.quant.rtn import rtn_quantize
    from moecompress.quant.spec import QuantSpec
    from moecompress.quant.tune import TuneItem, start_offsets, tune_codes
    from moecompress.tiny import build_tiny

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dev, dtype = torch.device(args.device), torch.bfloat16 if cuda else torch.float32
    model = build_tiny("qwen3_moe", num_hidden_layers=1, hidden_size=args.hidden, moe_intermediate_size=args.inter,
                       num_experts=args.experts, num_experts_per_tok=args.top_k, intermediate_size=args.inter,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=128, vocab_size=256)
    block = model.model.layers[0].mlp.to(dev, dtype)
    del model
    torch.manual_seed(0)
    xs = [torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dtype) for _ in range(args.batches)]
    with torch.no_grad():
        refs = [layer_output(block(x)) for x in xs]
    spec = QuantSpec(bits=4, group_size=128, symmetric=True, clip_ratios=(1.0,))
    items = []
    for name, p in block.named_parameters():
        if p.dim() == 3:  # the experts' batched weights (the router stays float)
            qw = rtn_quantize(p.detach(), spec)
            items.append(TuneItem(name, qw, start_offsets(qw, p.detach())))
            with torch.no_grad():
                p.copy_(qw.dequantize())
    weights = sum(it.qw.qweight.numel() for it in items)
    peak = vm_hwm
    if cuda:  # the GPU's peak of allocated memory, from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        peak = torch.cuda.max_memory_allocated
    base = peak()
    out = {"mode": args.mode, "weights": weights, "bf16_bytes": 2 * weights, "baseline_peak": base}
    if args.mode in ("tune", "twin"):
        if args.mode == "twin":
            from moecompress.quant import tune

            tune._TunedWeight.apply = staticmethod(lambda u, a, qw, dtype: tune._weight(qw, u, a).to(dtype))
        run = lambda b, w: layer_output(functional_call(block, w, (xs[b],), strict=False))  # noqa: E731
        times = []
        t = [time.perf_counter()]

        def step(_loss):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - t[0])
            t[0] = now

        _, info = tune_codes(block, items, run, refs, args.steps, on_step=step)
        times.sort()
        out.update(step_s_median=times[len(times) // 2], peak=peak())
        out["extra_over_bf16"] = (out["peak"] - base) / out["bf16_bytes"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (fp32; peak RSS) or cuda (bf16; peak allocated GPU memory)")
    ap.add_argument("--mode", choices=["none", "twin", "tune"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in ("none", "twin", "tune"):
        cmd = [sys.executable, __file__, "--mode", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                           if k != "mode"]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    none, twin, tune = rows
    gib = 2 ** 30
    print(f"block: {args.experts} experts x 3 x {args.hidden} x {args.inter} = {tune['weights'] / 1e6:.0f}M weights "
          f"({tune['bf16_bytes'] / gib:.2f} GiB in bf16); {args.batches} batches of {args.tokens} tokens, "
          f"{args.threads} threads")
    what = "peak allocated GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"{what}, no tuning: {none['baseline_peak'] / gib:.2f} GiB")
    for name, r in (("autograd twin (_weight)", twin), ("own backward (_TunedWeight)", tune)):
        print(f"{name:28s} peak {r['peak'] / gib:.2f} GiB (+{(r['peak'] - r['baseline_peak']) / gib:.2f} GiB = "
              f"{r['extra_over_bf16']:.1f}x the block's bf16 size), median step {r['step_s_median']:.3f} s")
    print(f"ratios, own / twin: extra memory {tune['extra_over_bf16'] / twin['extra_over_bf16']:.2f}, "
          f"step time {tune['step_s_median'] / twin['step_s_median']:.2f}")

if __name__ == "__main__":
    main()
