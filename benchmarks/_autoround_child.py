"""AutoRound side of benchmarks/vs_autoround.py: W{bits} g{group} with Intel's AutoRound on given windows, on the CPU.

Runs inside AutoRound's virtual environment (see benchmarks/README.md, "AutoRound") and must not import
moecompress. The calibration windows come from the driver as a safetensors file holding one LongTensor
``input_ids [n_samples, seq_len]``; they are handed to ``AutoRound`` as its ``dataset``, a list of
``[batch, seq_len]`` tensors in order (AutoRound then masks, as it does for any tensor input, the last
position of every window and any token equal to the tokenizer's pad id: the count is reported). Prints
one JSON line (prefixed ``AUTOROUND_RESULT``) with the timings, the sha256 of the windows fed and the
versions.

    /work/autoround-venv/bin/python benchmarks/_autoround_child.py --model DIR --out DIR --windows FILE \
        --bits 4 --group-size 128 [--asym] [--recipe default|light|best|opt_rtn] [--twin DIR]

Recipes are AutoRound's CLI recipes (``auto_round.cli.main.RECIPES``): ``default`` 200 sign-gradient
iterations, ``light`` 50 at lr 5e-3, ``best`` 1000, ``opt_rtn`` no iterations (its optimized RTN); the
batch size and the windows are the driver's (``best`` would use 512 windows of 2048 tokens; here it gets the
same windows as every tool). Everything else is AutoRound's default on a CPU: its ``amp`` and
``torch.compile`` where it enables them, routers (``mlp.gate``) and ``lm_head`` left in high precision by
its own MoE rules. The output is saved with ``format="auto_gptq"`` (``quant_method: gptq``, per-expert
``qweight/qzeros/scales/g_idx``), which moecompress's reader and every GPTQ loader read.

``--twin DIR``: also write a dense float32 checkpoint of what was saved, each linear unpacked by
AutoRound's own torch ``QuantLinear`` (``auto_round_extension.torch.qlinear_torch_zp``, the GPTQ layout
with zero points stored minus one), with its scales widened to fp32 so the product is exact; the driver
compares it, parameter by parameter, with moecompress's reading of the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

T_START = time.perf_counter()

from _child_util import vm_hwm, windows_sha256, write_dense_twin  # noqa: E402 - this folder

RECIPES = {"default": {"iters": 200}, "light": {"iters": 50, "lr": 5e-3}, "best": {"iters": 1000},
           "opt_rtn": {"iters": 0, "disable_opt_rtn": False}}


def write_twin(out: str, twin: str) -> dict:
    """Dense float32 copy of GPTQ checkpoint ``out`` in ``twin``, unpacked by AutoRound's torch QuantLinear."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    src, dst = Path(out), Path(twin)
    dst.mkdir(parents=True, exist_ok=True)
    qcfg = json.loads((src / "config.json").read_text())["quantization_config"]
    bits, group_size = qcfg["bits"], qcfg["group_size"]
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    dense, n = {}, 0
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            scales = tensors[p + ".scales"]
            infeatures, outfeatures = t.shape[0] * 32 // bits, scales.shape[1]
            q = QuantLinear(bits, group_size, infeatures, outfeatures, bias=False, g_idx=p + ".g_idx" in tensors)
            q.qweight, q.qzeros, q.scales = t, tensors[p + ".qzeros"], scales.float()
            if p + ".g_idx" in tensors:
                q.g_idx = tensors[p + ".g_idx"]
            with torch.no_grad():
                w_t = q(torch.eye(infeatures, dtype=torch.float32))  # x @ W^T with x = I: W^T [in, out]
            dense[p + ".weight"] = w_t.t().contiguous()
            n += 1
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            dense[name] = t.float() if t.is_floating_point() else t
    write_dense_twin(src, dst, dense)
    return {"path": str(dst), "dequantized_modules": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=42, help="AutoRound's seed (its default 42)")
    ap.add_argument("--twin", help="also write a dense float32 checkpoint here (AutoRound's QuantLinear)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round import AutoRound

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - T_START
    input_ids = load_file(args.windows)["input_ids"]
    n, seq_len = input_ids.shape
    sha = windows_sha256(input_ids)
    data = [input_ids[i:i + args.batch_size] for i in range(0, n, args.batch_size)]

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    pad = getattr(tok, "pad_token_id", None)
    recipe = dict(RECIPES[args.recipe])
    tmp_out = args.out.rstrip("/") + ".autoround"
    shutil.rmtree(tmp_out, ignore_errors=True)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme="W4A16", bits=args.bits, group_size=args.group_size,
                   sym=not args.asym, nsamples=n, seqlen=seq_len, batch_size=args.batch_size, dataset=data,
                   seed=args.seed, device_map="cpu", **recipe)
    ar.quantize_and_save(tmp_out, format="auto_gptq")
    t_quantize = time.perf_counter() - t0
    # AutoRound saves into a sub-folder named after the model and scheme; move it to --out.
    subdirs = [d for d in os.listdir(tmp_out) if os.path.isfile(os.path.join(tmp_out, d, "config.json"))]
    src = os.path.join(tmp_out, subdirs[0]) if len(subdirs) == 1 else tmp_out
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.move(src, args.out)
    shutil.rmtree(tmp_out, ignore_errors=True)

    twin = write_twin(args.out, args.twin) if args.twin else None

    from importlib.metadata import version

    qcfg = json.load(open(os.path.join(args.out, "config.json"))).get("quantization_config", {})
    print("AUTOROUND_RESULT " + json.dumps({
        "windows_sha256": sha, "windows_shape": [n, seq_len],
        "pad_token_id": pad, "windows_tokens_equal_to_pad": int((input_ids == pad).sum()) if pad is not None else 0,
        "recipe": {"name": args.recipe, **recipe, "batch_size": args.batch_size, "sym": not args.asym,
                   "seed": args.seed},
        "quantization_config": qcfg, "twin": twin,
        "timings_s": {"imports": t_import, "load": t_load, "quantize": t_quantize,
                      "total": time.perf_counter() - T_START},
        "vm_hwm": vm_hwm(), "torch_threads": torch.get_num_threads(),
        "versions": {"auto_round": version("auto-round"), "torch": torch.__version__,
                     "transformers": version("transformers")},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
