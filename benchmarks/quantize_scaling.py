"""`quantize` on 1 and 2 torchrun ranks, measured per layer here, and projected to 1-8 GPUs for real MoEs.

    python benchmarks/quantize_scaling.py [--ranks 1,2] [--json out.json]

Measured (CPU, gloo, one torch thread per rank): a Qwen3-MoE-shaped model (hidden 512, 32 experts of
256, top-4, 2 layers, random bf16) quantized with GPTQ W4 g128 on 32 x 256 calibration tokens, once per
rank count. Per layer, from moecompress.json: calibration, solving and feed seconds, the seconds spent in
collectives and the bytes each rank received, next to the byte model below (which it must match).

Projected: per layer, time on N GPUs = compute / N + communication, where

* compute: the single-GPU seconds of one layer. For Qwen3-30B-A3B it is the H200 measurement
  (``--anchor-s``, benchmarks/RESULTS.md 2026-12-04: 29 s per layer, GPTQ W4 g128, 128 x 2048 tokens),
  split into solving (``--anchor-solve-share``: the experts' GPTQ, read off that run's progress bars) and
  calibration forwards + Hessians. For another shape both parts are scaled by their operation counts:
  solving by sum over linears of members x (K^2 N + K^3) (GPTQ's column sweep and Cholesky), calibration by
  tokens x (attention weights + top-k x expert weights) + routed tokens x K^2 (the Hessians);
* dividing by N assumes the work splits evenly: ``reduce_chunks`` = 8 chunks of calibration batches and
  expert blocks of 16 (8 per projection of 128 experts), both divisible by N <= 8;
* communication: the bytes each rank receives per layer (the byte model: the other chunks' statistics are
  broadcast one chunk at a time, except the per-expert sums, which only each block's owner receives, and the
  solved parts it does not own are broadcast to it) over ``--link-gbps``
  (default 360 GB/s: NCCL's all-gather bus bandwidth on 8 H100/H200 SXM with NVSwitch, as nccl-tests
  report it), plus ``--latency-us`` per collective.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CPU_SHAPE = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64, intermediate_size=1024,
                 moe_intermediate_size=256, num_experts=32, num_experts_per_tok=4, num_hidden_layers=2,
                 max_position_embeddings=512)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    inter: int
    top_k: int
    layers: int


REAL = {s.name: s for s in (
    Shape("qwen3-30b-a3b", 2048, 32, 4, 128, 128, 768, 8, 48),
    Shape("qwen3-235b-a22b", 4096, 64, 4, 128, 128, 1536, 8, 94),
)}
F32, I64 = 4, 8


def stats_bytes(s: Shape) -> int:
    """One chunk's statistics of one layer, as packed by calib.capture.pack_stats (every stage)."""
    h, i, e, q = s.hidden, s.inter, s.experts, s.heads * s.head_dim
    linear = lambda k: k * k * F32 + k * F32 + I64  # noqa: E731  sums, abs_sums, count
    experts = lambda k: e * k * k * F32 + 2 * e * I64 + k * k * F32 + I64 + e * k * F32 + k * F32  # noqa: E731
    return 3 * linear(h) + linear(q) + experts(h) + experts(i)


def solved_bytes(s: Shape, group: int = 128) -> int:
    """The quantized layer as gathered: uint8 codes, fp32 scales, uint8 zeros (the errors travel as objects)."""
    h, i, e, q, kv = s.hidden, s.inter, s.experts, s.heads * s.head_dim, s.kv_heads * s.head_dim
    lin = lambda n, k, m=1: m * (n * k + n * (k // group) * (F32 + 1))  # noqa: E731
    return lin(q, h) + 2 * lin(kv, h) + lin(h, q) + lin(2 * i, h, e) + lin(h, i, e)


def expert_sums_bytes(s: Shape) -> int:
    """The per-expert sums of one chunk (both projections): reduced to each block's owner only."""
    return s.experts * (s.hidden ** 2 + s.inter ** 2) * F32


def received_bytes(s: Shape, ranks: int, chunks: int = 8) -> float:
    """Mean bytes a rank receives per layer: the replicated statistics of the other ranks' chunks, its
    share (1/N) of their per-expert sums, and the solved parts it does not own."""
    if ranks == 1:
        return 0.0
    rounds = -(-chunks // ranks)
    replicated = stats_bytes(s) - expert_sums_bytes(s)
    return rounds * (ranks - 1) * (replicated + expert_sums_bytes(s) / ranks) + (ranks - 1) / ranks * solved_bytes(s)


def collectives(ranks: int, chunks: int = 8, blocks: int = 8, captures: int = 4, solved_parts: int = 20) -> int:
    """Collectives per layer: per capture and round a shape broadcast, one broadcast per rank and dtype (2)
    and N - 1 point-to-point sends per expert block of the two expert projections; per solved part a
    metadata gather and ~5 tensor broadcasts."""
    if ranks == 1:
        return 0
    rounds = -(-chunks // ranks)
    return captures * rounds * (1 + 2 * ranks) + 2 * blocks * rounds * (ranks - 1) + 6 * solved_parts


def solve_ops(s: Shape) -> float:
    h, i, e, q, kv = s.hidden, s.inter, s.experts, s.heads * s.head_dim, s.kv_heads * s.head_dim
    g = lambda n, k, m=1: m * (k * k * n + k ** 3)  # noqa: E731
    return g(q, h) + 2 * g(kv, h) + g(h, q) + g(2 * i, h, e) + g(h, i, e)


def calib_ops(s: Shape) -> float:
    h, i, q, kv = s.hidden, s.inter, s.heads * s.head_dim, s.kv_heads * s.head_dim
    weights = h * (q + 2 * kv) + q * h + s.top_k * 3 * h * i
    hessians = 4 * h * h + q * q + s.top_k * (h * h + i * i)
    return weights + hessians


def project(shape: Shape, anchor_s: float, solve_share: float, link_gbps: float, latency_us: float,
            ranks=(1, 2, 4, 8)) -> list[dict]:
    base = REAL["qwen3-30b-a3b"]
    solve = anchor_s * solve_share * solve_ops(shape) / solve_ops(base)
    calib = anchor_s * (1 - solve_share) * calib_ops(shape) / calib_ops(base)
    out = []
    for n in ranks:
        comm = received_bytes(shape, n) / (link_gbps * 1e9) + collectives(n) * latency_us * 1e-6
        layer = (solve + calib) / n + comm
        out.append({"shape": shape.name, "ranks": n, "layer_s": layer, "compute_s": (solve + calib) / n,
                    "comm_s": comm, "comm_share": comm / layer, "received_gb": received_bytes(shape, n) / 1e9,
                    "model_min": layer * shape.layers / 60})
    return out


def measure(ranks: list[int], workdir: Path) -> dict:
    from moecompress.tiny import save_tiny

    src = workdir / "model"
    if not (src / "config.json").exists():
        import torch

        save_tiny("qwen3_moe", src, dtype=torch.bfloat16, **CPU_SHAPE)
    args = ["quantize", str(src), "--bits", "4", "--group-size", "128", "--calib-samples", "32", "--seq-len", "256",
            "--batch-size", "4", "--threads", "1", "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = {}
    for n in ranks:
        out = workdir / f"q{n}"
        launch = [sys.executable, "-m", "moecompress"] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(29650 + n), "-m", "moecompress"]
        p = subprocess.run(launch + args + ["--out", str(out)], capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(f"{n} ranks failed:\n{p.stderr[-3000:]}")
        summary = json.loads((out / "moecompress.json").read_text())
        res[n] = {"wall_s": summary["timings_s"]["total"], "layers": [
            {"layer": r["layer"], "seconds": r["seconds"], **r["timings_s"], "received": r["comm_bytes_received"]}
            for r in summary["layers"]], "ranks": summary["distributed"]["ranks"]}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="quantize_scaling.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--anchor-s", type=float, default=29.0)
    ap.add_argument("--anchor-solve-share", type=float, default=0.55)
    ap.add_argument("--link-gbps", type=float, default=360.0)
    ap.add_argument("--latency-us", type=float, default=50.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moecompress-scaling-"))
    ranks = [int(r) for r in args.ranks.split(",")]

    measured = measure(ranks, workdir)
    cpu = Shape("cpu-bench", CPU_SHAPE["hidden_size"], CPU_SHAPE["num_attention_heads"],
                CPU_SHAPE["num_key_value_heads"], CPU_SHAPE["head_dim"], CPU_SHAPE["num_experts"],
                CPU_SHAPE["moe_intermediate_size"], CPU_SHAPE["num_experts_per_tok"], CPU_SHAPE["num_hidden_layers"])
    print(f"measured on this CPU (gloo, 1 thread per rank), {cpu.layers} layers of hidden {cpu.hidden}, "
          f"{cpu.experts} experts x {cpu.inter}, GPTQ W4 g128, 32 x 256 tokens, 8 chunks")
    print(f"{'ranks':>5} {'layer':>5} {'layer s':>8} {'calib s':>8} {'solve s':>8} {'feed s':>7} {'comm s':>7} "
          f"{'recv MB':>8} {'model MB':>9} {'comm %':>7}")
    for n, r in measured.items():
        for lr in r["layers"]:
            model = received_bytes(cpu, n) / 1e6
            print(f"{n:>5} {lr['layer']:>5} {lr['seconds']:8.2f} {lr['calib_s']:8.2f} {lr['solve_s']:8.2f} "
                  f"{lr['feed_s']:7.2f} {lr['comm_s']:7.2f} {lr['received'] / 1e6:8.1f} {model:9.1f} "
                  f"{100 * lr['comm_s'] / lr['seconds']:6.1f}%")
        print(f"{n:>5}   all wall {r['wall_s']:.2f} s" + (f" ({measured[ranks[0]]['wall_s'] / r['wall_s']:.2f}x "
                                                        f"the {ranks[0]}-rank run)" if n != ranks[0] else ""))
    proj = [row for name in REAL for row in project(REAL[name], args.anchor_s, args.anchor_solve_share,
                                                    args.link_gbps, args.latency_us)]
    print(f"\nPROJECTION (not measured): anchor {args.anchor_s} s per Qwen3-30B-A3B layer on one H200 "
          f"(solve share {args.anchor_solve_share}), link {args.link_gbps:.0f} GB/s, {args.latency_us:.0f} us x "
          f"{', '.join(f'{collectives(n)} ({n} GPUs)' for n in (2, 4, 8))} collectives per layer")
    print(f"{'shape':>16} {'GPUs':>4} {'layer s':>8} {'compute s':>9} {'comm s':>7} {'comm %':>7} {'recv GB':>8} "
          f"{'model min':>9}")
    for p in proj:
        print(f"{p['shape']:>16} {p['ranks']:>4} {p['layer_s']:8.2f} {p['compute_s']:9.2f} {p['comm_s']:7.3f} "
              f"{100 * p['comm_share']:6.1f}% {p['received_gb']:8.1f} {p['model_min']:9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"measured": measured, "projection": proj, "assumptions": {
            "anchor_s": args.anchor_s, "anchor_solve_share": args.anchor_solve_share, "link_gbps": args.link_gbps,
            "latency_us": args.latency_us, "collectives_per_layer": {n: collectives(n) for n in (2, 4, 8)}}},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
