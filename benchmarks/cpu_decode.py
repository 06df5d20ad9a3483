"""CPU decode speed: moecompress's runtime vs transformers ``generate``, same weights, fp32.

    python benchmarks/cpu_decode.py [--model DIR] [--tiny-family qwen3_moe] [--threads 2] \
        [--prompt-len 32] [--new-tokens 64] [--repeats 5] [--json out.json]

Models: ``--model`` (default: the trained demo model, built once and cached) and a tiny random
model of ``--tiny-family``. A quantized ``--model`` is compared against its dequantized twin, so
both sides run the very same float weights. transformers runs with its default experts
implementation and eos disabled (both sides generate exactly ``--new-tokens`` greedy tokens).

Both sides are timed the same way, from outside: decode tokens/s = (N - 1) / (t(N) - t(1)), where
t(n) is the wall time of generating n tokens after the same prompt (t(1) is prefill plus one
sampling). Runs alternate between the two sides so that load on a shared machine hits both alike;
each figure is the median over ``--repeats`` pairs. The runtime's own in-loop measurement is
printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _hf_model(path: Path, tmp: Path):
    from transformers import AutoModelForCausalLM

    from moecompress.checkpoint.dequant import write_dequantized

    if "quantization_config" in json.loads((path / "config.json").read_text()):
        path = write_dequantized(path, tmp / f"{path.name}-dequantized")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def _timer(fn):
    def run(n: int) -> float:
        t = time.perf_counter()
        fn(n)
        return time.perf_counter() - t
    return run


def compare(path: Path, tmp: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from moecompress.runtime import Runtime

    rt = Runtime.load(path, device="cpu", dtype="float32")
    hf = _hf_model(path, tmp)
    prompt = torch.randint(0, rt.model.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def hf_generate(n: int):
        return hf.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)

    internal: list[float] = []

    def ours_generate(n: int):
        r = rt.generate(prompt, n, stop_ids=[])
        if n > 1:
            internal.append(r.decode_tokens_per_s)
        return r

    # same tokens on both sides (the same greedy decoding of the same weights)
    same = hf_generate(new_tokens)[0, prompt_len:].tolist() == ours_generate(new_tokens).tokens[0]
    internal.clear()
    sides = {"transformers": _timer(hf_generate), "moecompress": _timer(ours_generate)}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            t_n, t_1 = run(new_tokens), run(1)
            rates[name].append((new_tokens - 1) / (t_n - t_1) if t_n > t_1 else float("nan"))  # (noise-swamped)
    ours, theirs = statistics.median(rates["moecompress"]), statistics.median(rates["transformers"])
    return {
        "model": str(path),
        "family": rt.family,
        "experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "same_tokens": same,
        "transformers_decode_tokens_per_s": theirs,
        "moecompress_decode_tokens_per_s": ours,
        "moecompress_internal_decode_tokens_per_s": statistics.median(internal),
        "ratio": ours / theirs,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the demo model)")
    ap.add_argument("--tiny-family", default="qwen3_moe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from moecompress.demo_model import demo_model_path
    from moecompress.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        models = [args.model or demo_model_path(), save_tiny(args.tiny_family, tmp / f"tiny-{args.tiny_family}")]
        results = [compare(Path(m), tmp, args.prompt_len, args.new_tokens, args.repeats) for m in models]
    print(f"{'model':<44} {'transformers':>13} {'moecompress':>12} {'(in-loop)':>10} {'ratio':>6}  same tokens")
    for r in results:
        name = Path(r["model"]).name
        print(f"{name:<44} {r['transformers_decode_tokens_per_s']:>13.1f} {r['moecompress_decode_tokens_per_s']:>12.1f} "
              f"{r['moecompress_internal_decode_tokens_per_s']:>10.1f} {r['ratio']:>6.2f}  {r['same_tokens']}")
    print(f"decode tokens/s, fp32, {args.threads} threads, batch 1, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, median of {args.repeats}; transformers experts: {results[0]['experts_implementation']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
