"""The runtime on a CPU with packed int4 weights: resident memory and decode/prefill speed, side by side.

    python benchmarks/cpu_packed_decode.py [--models qwen3-30b-a3b-2L,wide] [--threads 2] [--batches 1,8] \
        [--new-tokens 32] [--prompts 128,512] [--repeats 3] [--sides packed,packed-kernel,...] [--json out.json]

Models (each quantized once with RTN int4 g128 symmetric, compressed-tensors, cached in --workdir):

* ``qwen3-30b-a3b-2L`` (``-4L``): random bf16 weights with Qwen3-30B-A3B's layer shapes (hidden 2048, 32/4 heads,
  128 experts of 768, top-8) but 2 (4) layers and a 32000-token vocabulary (the real 151936 x 2048 embedding
  and head would be most of a 2-layer model and say nothing about the layers);
* ``wide`` / ``demo``: the trained demo model's variant (built once and cached by moecompress.demo_model:
  ~11 min for wide on 2 cores the first time);
* any quantized checkpoint folder.

Each side runs in a fresh process (so resident memory is its own), with the same torch threads:

* ``packed``: our runtime, quantized weights packed (``cpu_weights="packed"``: torch's int4 CPU kernel, and
  from ``runtime.cpu_gemm.DEQUANT_ROWS`` rows on, the weight dequantized to bf16 and one GEMM);
* ``packed-kernel``: the same with the kernel for every row count (how packed ran before runtime.cpu_gemm);
* ``dequantized``: our runtime on fp32 weights dequantized at load (the path before packed execution);
* ``transformers``: ``AutoModelForCausalLM.generate`` (fp32) on a dequantized copy of the checkpoint.

Resident memory: RSS after loading minus RSS before loading (after every import), against the
checkpoint's size on disk, and the same after every run ("after runs": KV caches and scratch buffers freed
or kept by the allocator); "peak x": the resident peak during the load over the same baseline. With both
``qwen3-30b-a3b-2L`` and ``-4L``, the difference between them per extra checkpoint byte is printed too:
what a deep model's ratio tends to, without the fixed part (code the load imports, library state). Decode tokens/s = (N - 1) / (t(N) - t(1)) from the wall time of generating N and
1 greedy tokens after the same prompt, median of ``--repeats``; prefill tokens/s of each ``--prompts``
length (one sequence, the time to its first token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {f"qwen3-30b-a3b-{n}L": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                      intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                      num_experts_per_tok=8, norm_topk_prob=True, vocab_size=32000,
                                      num_hidden_layers=n, max_position_embeddings=4096) for n in (2, 4)}
SIDES = ("packed", "packed-kernel", "dequantized", "transformers")


def prepare(name: str, workdir: Path) -> Path:
    """The quantized checkpoint of ``name`` (built and quantized once)."""
    import torch

    from moecompress.pipeline import quantize
    from moecompress.settings import build_config

    if Path(name).is_dir():
        return Path(name)
    q = workdir / f"{name}-int4"
    if (q / "config.json").exists():
        return q
    if name in SHAPES:
        from moecompress.tiny import save_tiny

        src = workdir / f"{name}-bf16"
        if not (src / "config.json").exists():
            save_tiny("qwen3_moe", src, dtype=torch.bfloat16, **SHAPES[name])
    else:
        from moecompress.demo_model import demo_model_path

        src = demo_model_path(variant=name)
    quantize(src, q, build_config(method="rtn", bits=4, group_size=128, measure_errors=False))
    return q


def _peak_rss() -> int:
    """VmHWM (Linux; 0 elsewhere): the resident peak since the process began, or since the last reset."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def child(args) -> dict:
    """One side, in this process: load, then time."""
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (every side pays the same imports before the RSS baseline)

    from moecompress.runtime import Runtime

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    Path("/proc/self/clear_refs").exists() and Path("/proc/self/clear_refs").write_text("5")  # peak := now
    t_load = time.perf_counter()
    path = Path(args.model)
    if args.side == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        vocab = model.config.vocab_size

        @torch.no_grad()
        def gen(ids, n):
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    else:
        if args.side == "packed-kernel":
            from moecompress.runtime import cpu_gemm

            cpu_gemm.DEQUANT_ROWS = 1 << 62
        rt = Runtime.load(path, device="cpu", dtype="float32", cpu_weights=args.side.split("-")[0])
        vocab = rt.model.vocab_size

        def gen(ids, n):
            rt.generate(ids, n, stop_ids=[])
    t_load = time.perf_counter() - t_load
    rss1 = proc.memory_info().rss
    out = {"side": args.side, "rss_load_bytes": rss1 - rss0, "rss_bytes": rss1, "load_s": t_load,
           "peak_load_bytes": _peak_rss() - rss0, "decode": {}, "prefill": {}}
    g = torch.Generator().manual_seed(0)
    for b in args.batches:
        ids = torch.randint(0, vocab, (b, 16), generator=g)
        gen(ids, 2)  # warm-up
        t1, tn = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            gen(ids, 1)
            t1.append(time.perf_counter() - t)
            t = time.perf_counter()
            gen(ids, args.new_tokens)
            tn.append(time.perf_counter() - t)
        dt = statistics.median(tn) - statistics.median(t1)
        out["decode"][str(b)] = b * (args.new_tokens - 1) / dt if dt > 0 else float("nan")  # (noise-swamped)
    for n in args.prompts:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        gen(ids, 1)  # warm-up
        t = []
        for _ in range(args.repeats):
            s = time.perf_counter()
            gen(ids, 1)
            t.append(time.perf_counter() - s)
        out["prefill"][str(n)] = n / statistics.median(t)
    out["rss_after_runs_bytes"] = proc.memory_info().rss - rss0
    return out


def _scheme(path: Path) -> str:
    """``int4 g128`` (and ``+ int8: self_attn`` per --override) from the checkpoint's moecompress.json."""
    try:
        r = json.loads((Path(path) / "moecompress.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError):
        return "quantized"
    extra = "".join(f" + int{o.get('bits') or r['bits']}: {o['match']}" for o in r.get("overrides") or [])
    return f"int{r['bits']} g{r['group_size'] or 'channel'}{extra}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cpu_packed_decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-30b-a3b-2L")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", default="128,512", help="prefill prompt lengths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moecompress-cpu-packed")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dense", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.prompts = [int(n) for n in str(args.prompts).split(",")]
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        q = prepare(name, args.workdir)
        dense = args.workdir / f"{q.name}-dequantized"
        if not (dense / "config.json").exists():
            from moecompress.checkpoint.dequant import write_dequantized

            write_dequantized(q, dense)
        size = sum(f.stat().st_size for f in q.glob("*.safetensors"))
        rows = {}
        for side in args.sides.split(","):
            cmd = [sys.executable, __file__, "--child", "--side", side, "--model", str(q), "--dense", str(dense),
                   "--threads", str(args.threads), "--batches", ",".join(map(str, args.batches)),
                   "--new-tokens", str(args.new_tokens), "--prompts", ",".join(map(str, args.prompts)),
                   "--repeats", str(args.repeats)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                rows[side] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
                continue
            rows[side] = json.loads(line[0][7:])
        results[name] = {"checkpoint": str(q), "checkpoint_bytes": size, "sides": rows}
        print(f"\n{name}: {_scheme(q)} checkpoint {size / 2**20:.1f} MiB ({q}); {args.threads} threads")
        print(f"{'side':>13} {'load s':>6} {'peak x':>6} {'load RSS MiB':>12} {'x ckpt':>7} {'after runs':>10} "
              + " ".join(f"{'dec b' + str(b):>9}" for b in args.batches)
              + " ".join(f" {'pre ' + str(n):>8}" for n in args.prompts))
        for side, r in rows.items():
            if "error" in r:
                print(f"{side:>13} failed: {r['error']}")
                continue
            print(f"{side:>13} {r['load_s']:6.1f} {r['peak_load_bytes'] / size:6.2f} "
                  f"{r['rss_load_bytes'] / 2**20:12.1f} {r['rss_load_bytes'] / size:7.2f} "
                  f"{r['rss_after_runs_bytes'] / size:10.2f} "
                  + " ".join(f"{r['decode'][str(b)]:9.1f}" for b in args.batches)
                  + " ".join(f" {r['prefill'][str(n)]:8.0f}" for n in args.prompts))
        ok = {s: r for s, r in rows.items() if "error" not in r}
        if "packed" in ok:
            for other in ("packed-kernel", "dequantized", "transformers"):
                if other in ok:
                    ratios = ", ".join(f"batch {b}: {ok['packed']['decode'][str(b)] / ok[other]['decode'][str(b)]:.2f}x"
                                       for b in args.batches)
                    pre = ", ".join(f"{n}: {ok['packed']['prefill'][str(n)] / ok[other]['prefill'][str(n)]:.2f}x"
                                    for n in args.prompts)
                    print(f"  packed decode vs {other}: {ratios}; prefill {pre}")
    _marginal(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0



def _marginal(results: dict) -> None:
    """For two shape models that differ only in depth: the resident memory each extra checkpoint byte costs
    (what a 48-layer model's ratio tends to; the fixed part -- code imported during the load, library state --
    drops out)."""
    shaped = sorted((SHAPES[n]["num_hidden_layers"], n) for n in results if n in SHAPES)
    for (_, a), (_, b) in zip(shaped, shaped[1:]):
        ra, rb = results[a], results[b]
        dsize = rb["checkpoint_bytes"] - ra["checkpoint_bytes"]
        for side in rb["sides"]:
            sa, sb = ra["sides"].get(side, {}), rb["sides"][side]
            if "error" in sa or "error" in sb or not sa:
                continue
            print(f"  {side}: {b} - {a}: load RSS {(sb['rss_load_bytes'] - sa['rss_load_bytes']) / dsize:.3f}x, "
                  f"peak {(sb['peak_load_bytes'] - sa['peak_load_bytes']) / dsize:.3f}x, after runs "
                  f"{(sb['rss_after_runs_bytes'] - sa['rss_after_runs_bytes']) / dsize:.3f}x the extra checkpoint bytes "
                  f"({dsize / 2**20:.0f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
