"""What reading an FP8 release costs against its bf16 conversion: whole `quantize` runs and one layer's read.

The model is ``cpu_packed_decode.py``'s random bf16 one with Qwen3-30B-A3B's layer shapes (2 layers, 128
experts of 768 x 2048, 32000-token vocabulary), made once in ``--workdir``; its FP8 release (``tiny.save_fp8``:
e4m3, 128 x 128 blocks, like DeepSeek-V3 and Qwen3-*-FP8) and that release's bf16 conversion (written through
our FP8 reader, so both sources hold the same values) are made beside it. Then, alternating, each a fresh
process (wall time and peak RSS from ``os.wait4``):

    python -m moecompress quantize SRC --out OUT --method rtn --bits 4 --group-size 128 --no-measure-errors --threads T

(reads, rounds and writes every weight; no calibration) for SRC = the bf16 conversion and the FP8 release; the two outputs must be byte-identical (checked). In this
process, the read of every tensor of layer 0 through ``ModelHandle.reader`` is timed too (median of
``--repeats``; page cache warm, so this is decoding, not the disk).

    python benchmarks/fp8_source.py [--workdir /tmp/moecompress-cpu-packed] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cpu_packed_decode import SHAPES  # noqa: E402
from vs_llmcompressor import Launcher  # noqa: E402

MODEL = "qwen3-30b-a3b-2L"


def sources(workdir: Path) -> tuple[Path, Path]:
    """(bf16 conversion, FP8 release), made once."""
    from moecompress.arch.handle import ModelHandle
    from moecompress.checkpoint.writer import ShardedWriter, copy_side_files
    from moecompress.tiny import save_fp8, save_tiny

    src, fp8_dir, bf16_dir = workdir / f"{MODEL}-bf16", workdir / f"{MODEL}-fp8", workdir / f"{MODEL}-fp8-as-bf16"
    if not (src / "config.json").exists():
        save_tiny("qwen3_moe", src, dtype=torch.bfloat16, **SHAPES[MODEL])
    if not (fp8_dir / "config.json").exists():
        shutil.rmtree(fp8_dir, ignore_errors=True)
        save_fp8(src, fp8_dir, block=(128, 128))
    if not (bf16_dir / "config.json").exists():
        reader = ModelHandle.open(fp8_dir).reader
        bf16_dir.mkdir()
        writer = ShardedWriter(bf16_dir)
        for name in reader.names():
            writer.add(name, reader.get(name))
        writer.close()
        (bf16_dir / "config.json").write_text(json.dumps(reader.config, indent=2) + "\n")
        copy_side_files(fp8_dir, bf16_dir)
    return bf16_dir, fp8_dir


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def read_layer_s(path: Path, repeats: int) -> float:
    from moecompress.arch.handle import ModelHandle

    handle = ModelHandle.open(path)
    names = handle.layer_tensor_names(0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for n in names:
            handle.reader.get(n)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/moecompress-cpu-packed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bf16_dir, fp8_dir = sources(work)
    size = {k: sum(f.stat().st_size for f in p.glob("*.safetensors")) for k, p in (("bf16", bf16_dir), ("fp8", fp8_dir))}
    print(f"{MODEL}: bf16 conversion {size['bf16'] / 2**20:.0f} MiB, FP8 release {size['fp8'] / 2**20:.0f} MiB")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    launcher = Launcher()
    runs: dict[str, list[dict]] = {"bf16": [], "fp8": []}
    digests = {}
    try:
        for r in range(args.repeats):
            for side, src in (("bf16", bf16_dir), ("fp8", fp8_dir)):
                out = work / f"fp8-bench-out-{side}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "moecompress", "quantize", str(src), "--out", str(out), "--method", "rtn",
                       "--bits", "4", "--group-size", "128", "--no-measure-errors", "--threads", str(args.threads)]
                usage = launcher.run(cmd, work / f"fp8-bench-{side}.log", env)
                if usage["returncode"] != 0:
                    raise SystemExit(f"quantize of {src} failed; log {work / f'fp8-bench-{side}.log'}")
                runs[side].append(usage)
                digests[side] = digest(out)
                print(f"[{r + 1}/{args.repeats}] {side}: {usage['wall_s']:.1f}s wall, peak RSS "
                      f"{usage['maxrss_kib'] / 2**10:.0f} MiB", flush=True)
    finally:
        launcher.close()
    same = digests["bf16"] == digests["fp8"]
    reads = {side: read_layer_s(p, args.repeats) for side, p in (("bf16", bf16_dir), ("fp8", fp8_dir))}
    med = {s: statistics.median(u["wall_s"] for u in runs[s]) for s in runs}
    peak = {s: statistics.median(u["maxrss_kib"] for u in runs[s]) * 1024 for s in runs}
    print(f"\n{'':34}{'bf16 source':>14}{'FP8 source':>14}{'FP8 / bf16':>12}")
    print(f"{'quantize --method rtn, wall (s)':34}{med['bf16']:14.1f}{med['fp8']:14.1f}{med['fp8'] / med['bf16']:12.2f}")
    print(f"{'  peak RSS (MiB)':34}{peak['bf16'] / 2**20:14.0f}{peak['fp8'] / 2**20:14.0f}"
          f"{peak['fp8'] / peak['bf16']:12.2f}")
    print(f"{'read layer 0, every tensor (s)':34}{reads['bf16']:14.2f}{reads['fp8']:14.2f}{reads['fp8'] / reads['bf16']:12.2f}")
    print(f"{'checkpoint on disk (MiB)':34}{size['bf16'] / 2**20:14.0f}{size['fp8'] / 2**20:14.0f}"
          f"{size['fp8'] / size['bf16']:12.2f}")
    print(f"outputs byte-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
