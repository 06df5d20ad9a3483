"""GPTQModel side of benchmarks/vs_gptqmodel_speed.py: GPTQ W{bits} g{group_size} with GPTQModel on given windows, CPU.

Runs inside GPTQModel's virtual environment (see benchmarks/README.md, "GPTQModel interop") and must
not import moecompress. The calibration windows come from the driver as a safetensors file holding one
LongTensor ``input_ids [n_samples, seq_len]``; they are passed to ``BaseQModel.quantize`` unchanged, as a
list of ``{"input_ids", "attention_mask"}`` rows (``calibration_sort=None``: no reordering). Prints one
JSON line (prefixed ``GPTQMODEL_RESULT``) with in-process timings (imports, load, quantize, save), the
sha256 of the windows fed, the quantization config GPTQModel wrote and the versions.

    /work/gptqmodel-venv/bin/python benchmarks/_gptqmodel_gptq_child.py --model DIR --out DIR \
        --windows FILE [--bits 4] [--group-size 128] [--batch-size 8] [--dtype bfloat16] [--threads 2] \
        [--dynamic JSON]

Recipe: ``GPTQConfig(bits, group_size, sym=True)`` with GPTQModel's defaults otherwise (``desc_act``,
``act_group_aware``, damping, MoE handling, disk offload, its Qwen3-MoE module tree: the router
``mlp.gate`` is never quantized). CPU constraints of GPTQModel 7.7 handled as in
``_gptqmodel_awq_child.py``: ``GPTQMODEL_CPU_WORKERS=2`` unless set (its ``model_loader:cpu`` pool asks
for 2 workers, more than its default CPU budget grants on a 2-core machine); its torch GPTQ kernel takes
fp16/bf16 only, so the model is loaded in ``--dtype`` (default bfloat16, the checkpoint's own dtype);
disk offload goes to ``<out>.offload``, removed after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

T_START = time.perf_counter()
if not os.environ.get("GPTQMODEL_CPU_WORKERS"):
    os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--dynamic", default=None,
                    help='GPTQModel per-module rules as JSON, e.g. \'{"+:.*self_attn.*": {"bits": 8}}\'')
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import GPTQConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - T_START
    input_ids = load_file(args.windows)["input_ids"]
    n, seq_len = input_ids.shape
    sha = hashlib.sha256(input_ids.numpy().astype("<i8").tobytes()).hexdigest()  # as moecompress.calib.data
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len} for row in input_ids]

    offload = args.out.rstrip("/") + ".offload"
    t0 = time.perf_counter()
    extra = {"dynamic": json.loads(args.dynamic)} if args.dynamic else {}
    cfg = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=True, offload_to_disk_path=offload, **extra)
    model = GPTQModel.load(args.model, cfg, device="cpu", dtype=getattr(torch, args.dtype))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=args.batch_size, calibration_sort=None)
    t_quantize = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save(args.out)
    t_save = time.perf_counter() - t0
    shutil.rmtree(offload, ignore_errors=True)

    from importlib.metadata import version

    qcfg = json.load(open(os.path.join(args.out, "config.json"))).get("quantization_config", {})
    print("GPTQMODEL_RESULT " + json.dumps({
        "windows_sha256": sha, "n_samples": n, "seq_len": seq_len,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out", "windows")},
        "quantization_config": {k: qcfg.get(k) for k in ("quant_method", "format", "checkpoint_format", "bits",
                                                         "group_size", "sym", "desc_act", "act_group_aware",
                                                         "damp_percent", "true_sequential")},
        "timings_s": {"imports": t_import, "load": t_load, "quantize": t_quantize, "save": t_save,
                      "total": time.perf_counter() - T_START},
        "torch_threads": torch.get_num_threads(), "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        "versions": {d: version(d) for d in ("gptqmodel", "torch", "transformers", "accelerate")}
                    | {"python": sys.version.split()[0]},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
