"""Expert offload on a GPU: measured decode tokens/s per placement, beside `moecompress plan`'s estimate for it.

    python benchmarks/offload_decode.py [--model qwen3-30b-a3b-2L] [--near all,64,32,0] [--device cuda] \
        [--new-tokens 32] [--repeats 5] [--threads N] [--workdir DIR] [--json out.json]

``--model``: a quantized checkpoint folder, or a name of ``cpu_packed_decode.py`` (``qwen3-30b-a3b-2L``: random
weights with Qwen3-30B-A3B's layer shapes, 2 layers; built and RTN int4 g128 quantized once in ``--workdir``).
For each ``--near`` count n, every MoE layer keeps its experts 0..n-1 on the device and the others in host
memory, run on the CPU by the packed int4 kernels (``runtime.offload``); ``all`` is the unsplit runtime (CUDA
graphs on a GPU). A random model routes about uniformly, so which n experts are near does not matter; with a
trained model the plan would put the most used ones there.

Measured: decode tokens/s at batch 1 = (N - 1) / (t(N) - t(1)) from the wall time of generating N and 1 greedy
tokens after the same 16-token prompt, median of ``--repeats``. Beside it, ``runtime.plan.estimate`` for the same
placement twice: with the plan's default bandwidths (GPU 300, CPU 40, PCIe 16 GB/s) and with this machine's,
measured here: the device's and the host's ``copy_`` bandwidth (read + write bytes, 256 MiB) and a pinned
host-to-device copy (64 MiB). The estimate models memory-bound decode only (no kernel launch or Python costs), so
on a fast GPU the all-on-device row is expected to fall short of it; the offloaded rows show whether the host
side's bytes set the pace as the plan assumes.

``--device cpu`` runs the same placements with the "device" side on the CPU too (the split simulated, as in the
tests): a smoke run of this script, not a measurement of offload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _copy_gbps(device, nbytes: int) -> float:
    import torch

    from moecompress.kernels._bench_util import Timer, copy_bandwidth

    return copy_bandwidth(Timer(torch.device(device), flush_bytes=1 << 20), torch.device(device), nbytes)


def _h2d_gbps(nbytes: int) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(7):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times[2:]) / 1e9


def decode_rate(rt, vocab: int, new_tokens: int, repeats: int) -> float:
    """Decode tokens/s at batch 1: (N - 1) / (t(N) - t(1)), medians over ``repeats``."""
    import torch

    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    rt.generate(ids, 2, stop_ids=[])  # warm-up (and the CUDA graph's capture)
    t1, tn = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        rt.generate(ids, 1, stop_ids=[])
        t1.append(time.perf_counter() - t)
        t = time.perf_counter()
        rt.generate(ids, new_tokens, stop_ids=[])
        tn.append(time.perf_counter() - t)
    dt = statistics.median(tn) - statistics.median(t1)
    # (a difference the timer's noise swamps -- a few tokens, one repeat, a busy box -- is no rate: nan, not < 0)
    return (new_tokens - 1) / dt if dt > 0 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="offload_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-30b-a3b-2L")
    ap.add_argument("--near", default="all,64,32,0", help="experts per MoE layer kept on the device ('all': no offload)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moecompress-cpu-packed")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from cpu_packed_decode import prepare
    from moecompress.runtime import Runtime
    from moecompress.runtime.plan import estimate, model_parts

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("offload_decode.py: --device cuda, but this torch sees no CUDA device (--device cpu: a smoke run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    q = prepare(args.model, args.workdir)
    parts = model_parts(q)  # sizes at the checkpoint's own bits and groups
    n_experts = len(next(iter(parts.experts.values())))
    bw = {"gpu_gbps": _copy_gbps(args.device, 256 << 20), "cpu_gbps": _copy_gbps("cpu", 256 << 20),
          "pcie_gbps": _h2d_gbps(64 << 20)}
    measured_bw = {k: v for k, v in bw.items() if v is not None}
    print(f"{q}: {len(parts.experts)} MoE layers x {n_experts} experts, top-{parts.top_k}; device {args.device}, "
          f"{torch.get_num_threads()} CPU threads; bandwidths (GB/s): "
          + ", ".join(f"{k[:-5].replace('gpu', 'device')} {v:.1f}" for k, v in measured_bw.items()))
    rows = []
    for spec in args.near.split(","):
        n = n_experts if spec == "all" else int(spec)
        placed = {layer: list(range(min(n, n_experts))) for layer in parts.experts}
        offload = None if spec == "all" else placed
        rt = Runtime.load(q, device=args.device, offload=offload)
        rate = decode_rate(rt, rt.model.vocab_size, args.new_tokens, args.repeats)
        est_default = estimate(parts, placed)[0]
        est_here = estimate(parts, placed, **measured_bw)[0]
        rows.append({"near": spec, "experts_on_device": n, "offloaded_experts": rt.report.offloaded_experts,
                     "cuda_graph": rt.cuda_graph, "decode_tokens_per_s": rate,
                     "estimate_default_bw": est_default, "estimate_measured_bw": est_here})
        del rt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{'near':>5} {'offloaded':>9} {'graph':>5} {'decode tok/s':>12} {'estimate (defaults)':>19} "
          f"{'estimate (measured bw)':>22} {'measured / estimate':>19}")
    for r in rows:
        print(f"{r['near']:>5} {r['offloaded_experts']:9d} {str(r['cuda_graph']):>5} {r['decode_tokens_per_s']:12.1f} "
              f"{r['estimate_default_bw']:19.1f} {r['estimate_measured_bw']:22.1f} "
              f"{r['decode_tokens_per_s'] / r['estimate_measured_bw']:19.2f}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(q), "device": args.device, "threads": torch.get_num_threads(),
                                         "bandwidths_gbps": bw, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
