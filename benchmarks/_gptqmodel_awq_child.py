"""GPTQModel side of benchmarks/vs_llmcompressor_awq.py: AWQ W{bits} with GPTQModel on given windows, on the CPU.

Runs inside GPTQModel's virtual environment (see benchmarks/README.md, "GPTQModel interop") and must
not import moecompress. The calibration windows come from the driver as a safetensors file holding one
LongTensor ``input_ids [n_samples, seq_len]``; they are passed to ``BaseQModel.quantize`` unchanged, as a
list of ``{"input_ids", "attention_mask"}`` rows (``calibration_sort=None``: no reordering; no
concatenation; every row is longer than ``calibration_data_min_length``). Prints one JSON line
(prefixed ``GPTQMODEL_RESULT``) with the timings, the sha256 of the windows fed and the versions.

    /work/gptqmodel-venv/bin/python benchmarks/_gptqmodel_awq_child.py --model DIR --out DIR \
        --windows FILE --bits 4 --group-size 128 [--asym] [--batch-size 8] [--dtype bfloat16]

Recipe: ``AWQConfig(bits, group_size, sym)`` with GPTQModel's defaults otherwise (format GEMM, its
Qwen3-MoE module tree: the router ``mlp.gate`` is never quantized; experts ``gate_proj``/``up_proj``
balanced against the post-attention norm, ``down_proj`` against ``up_proj``; ``o_proj`` skipped under
grouped-query attention). Known CPU constraints of GPTQModel 7.7, handled here:

* its CPU thread pool asks for 2 workers for the ``model_loader:cpu`` virtual pool, more than its
  default CPU budget on a 2-core machine grants (``ValueError: Virtual pool 'model_loader:cpu'
  requests 2 workers but parent 'cpu' only has 1``): ``GPTQMODEL_CPU_WORKERS`` is set to 2 unless set;
* its AWQ GEMM torch module (``AwqTorchLinear``) packs fp16/bf16 only (``NotImplementedError: ...
  only supports [torch.float16, torch.bfloat16] dtype: actual dtype = torch.float32``), so the model is
  loaded and calibrated in ``--dtype`` (default bfloat16, the demo checkpoints' own dtype), not fp32;
* disk offload (its default) goes to ``<out>.offload`` instead of a system temp folder, removed after.

``--twin DIR``: also write a dense float checkpoint of what was saved, unpacked with GPTQModel's own
``dequantize_gemm`` (what its ``AwqTorchLinear`` multiplies by): 3-bit "AWQ GEMM" checkpoints (codes
packed contiguously, 32/3 per int32 word) are readable by GPTQModel only, so this is how the driver
evaluates them; at 4 bits the driver cross-checks it against moecompress's own reader.
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
if not os.environ.get("GPTQMODEL_CPU_WORKERS"):
    os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def write_twin(out: str, twin: str, bits: int, group_size: int) -> dict:
    """Dense float32 copy of checkpoint ``out`` in ``twin``: every ``P.qweight/qzeros/scales`` -> ``P.weight``."""
    from pathlib import Path

    from safetensors.torch import load_file

    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    src, dst = Path(out), Path(twin)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    dense, n = {}, 0
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            w = dequantize_gemm(t, tensors[p + ".qzeros"], tensors[p + ".scales"], bits, group_size)
            dense[p + ".weight"] = w.float().t().contiguous()  # AWQ GEMM stores [in, out]
            n += 1
        elif not name.endswith((".qzeros", ".scales")):
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
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--twin", help="also write a dense float32 checkpoint here (GPTQModel's dequantize_gemm)")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import AWQConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - T_START
    input_ids = load_file(args.windows)["input_ids"]
    n, seq_len = input_ids.shape
    sha = windows_sha256(input_ids)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len} for row in input_ids]

    offload = args.out.rstrip("/") + ".offload"
    t0 = time.perf_counter()
    cfg = AWQConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, offload_to_disk_path=offload)
    model = GPTQModel.load(args.model, cfg, device="cpu", dtype=getattr(torch, args.dtype))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=args.batch_size, calibration_sort=None)
    t_quantize = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save(args.out)
    t_save = time.perf_counter() - t0
    shutil.rmtree(offload, ignore_errors=True)

    twin = write_twin(args.out, args.twin, args.bits, args.group_size) if args.twin else None

    from importlib.metadata import version

    qcfg = json.load(open(os.path.join(args.out, "config.json"))).get("quantization_config", {})
    print("GPTQMODEL_RESULT " + json.dumps({
        "windows_sha256": sha, "n_samples": n, "seq_len": seq_len,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out", "windows")},
        "quantization_config": {k: qcfg.get(k) for k in ("quant_method", "format", "bits", "group_size", "sym",
                                                         "zero_point", "version")},
        "timings_s": {"imports": t_import, "load": t_load, "quantize": t_quantize, "save": t_save,
                      "total": time.perf_counter() - T_START},
        "twin": twin, "vm_hwm": vm_hwm(), "torch_threads": torch.get_num_threads(),
        "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        "versions": {d: version(d) for d in ("gptqmodel", "torch", "transformers", "accelerate")}
                    | {"python": sys.version.split()[0]},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
