"""Interop: GPTQModel loads what ``moecompress quantize --format awq`` writes (AWQ GEMM), and computes the same model.

Run in the main environment; the GPTQModel part runs in GPTQModel's own virtual environment (torch >= 2.14,
see ``gptqmodel_interop.py``) as a child process of this same file (``--child``, which must not import
moecompress):

1. for every setting ``family:method:sym|asym``, ``make-tiny`` (fp32) and ``quantize --format awq
   --group-size 32`` (RTN without data, or GPTQ on 8 x 64 builtin windows), then our dequantized twin
   (``moecompress.checkpoint.dequant.write_dequantized``);
2. the child loads each checkpoint with ``GPTQModel.load(..., device="cpu", backend="awq_torch",
   dtype=float16)`` and, for every AWQ module it built, unpacks the loaded ``qweight``/``qzeros``/``scales``
   with GPTQModel's own ``dequantize_gemm`` (what ``AwqTorchLinear.forward`` multiplies by) and compares it
   with the twin rounded to fp16 -- exact when the format is right; counts the checkpoint's quantized
   modules it did not build as AWQ modules; checks the routers stayed float; and runs one forward on fixed
   ids, compared with the fp32 twin loaded by transformers in the same process (and the twin's own fp16
   forward, the noise floor).

    python benchmarks/gptqmodel_awq_interop.py [--settings qwen3_moe:rtn:asym,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PYTHON = "/work/gptqmodel-venv/bin/python"
DEFAULT_SETTINGS = "qwen3_moe:rtn:asym,qwen3_moe:rtn:sym,qwen3_moe:gptq:sym,qwen2_moe:gptq:asym"


def prepare(settings: list[str], work: Path) -> list[dict]:
    from moecompress.checkpoint.dequant import write_dequantized
    from moecompress.pipeline import quantize
    from moecompress.settings import build_config
    from moecompress.tiny import save_tiny

    jobs = []
    for s in settings:
        family, method, sym = s.split(":")
        src = work / f"src-{family}"
        if not src.exists():
            save_tiny(family, src, seed=0)
        q = work / s.replace(":", "-")
        extra = {"measure_errors": False} if method == "rtn" else {}
        cfg = build_config(method=method, format="awq", bits=4, group_size=32, symmetric=sym == "sym",
                           calib_samples=8, seq_len=64, batch_size=4, **extra)
        quantize(src, q, cfg)
        twin = write_dequantized(q, work / (q.name + "-deq"))
        jobs.append({"name": s, "model": str(q), "twin": str(twin)})
    return jobs


def child(job_file: Path) -> dict:
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import AWQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec = json.loads(job_file.read_text())
    ids = torch.tensor(spec["input_ids"])
    out = {"versions": {}, "jobs": []}
    from importlib.metadata import version
    for d in ("gptqmodel", "torch", "transformers", "accelerate", "defuser"):
        out["versions"][d] = version(d)
    for job in spec["jobs"]:
        res = {"name": job["name"]}
        try:
            ckpt = {}
            for f in sorted(Path(job["model"]).glob("*.safetensors")):
                ckpt.update(load_file(str(f)))
            twin = {}
            for f in sorted(Path(job["twin"]).glob("*.safetensors")):
                twin.update(load_file(str(f)))
            t0 = time.perf_counter()
            qm = GPTQModel.load(job["model"], device="cpu", backend="awq_torch", dtype=torch.float16)
            res["load_s"] = round(time.perf_counter() - t0, 1)
            model = qm.model
            awq_mods = {n: m for n, m in model.named_modules() if isinstance(m, AWQuantLinear)}
            res["module_types"] = sorted({type(m).__name__ for m in awq_mods.values()})
            stored = {n[: -len(".qweight")] for n in ckpt if n.endswith(".qweight")}
            res["checkpoint_quantized"] = len(stored)
            res["loaded_awq"] = len(awq_mods)
            res["not_built_as_awq"] = sorted(stored - set(awq_mods))[:5]
            exact = raw_equal = 0
            worst = 0.0
            for n, m in awq_mods.items():
                same = all(torch.equal(getattr(m, s).cpu(), ckpt[f"{n}.{s}"]) for s in ("qweight", "qzeros"))
                raw_equal += same
                w = dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size).t().float()
                ref = twin[f"{n}.weight"].half().float()
                if torch.equal(w, ref):
                    exact += 1
                else:
                    worst = max(worst, ((w - ref).abs().max() / ref.abs().max()).item())
            res["weights_exact"] = f"{exact}/{len(awq_mods)}"
            res["packed_words_equal_checkpoint"] = f"{raw_equal}/{len(awq_mods)}"
            res["worst_rel_weight_diff"] = worst
            routers = {n: m for n, m in model.named_modules() if n.endswith(("mlp.gate", "shared_expert_gate"))}
            res["routers"] = {n: type(m).__name__ for n, m in list(routers.items())[:2]}
            res["routers_quantized"] = sum(isinstance(m, AWQuantLinear) for m in routers.values())
            with torch.no_grad():
                a = model(ids).logits.float()
                ref32 = AutoModelForCausalLM.from_pretrained(job["twin"], dtype=torch.float32,
                                                             experts_implementation="eager").eval()
                b = ref32(ids).logits.float()
                ref16 = AutoModelForCausalLM.from_pretrained(job["twin"], dtype=torch.float16,
                                                             experts_implementation="eager").eval()
                c = ref16(ids).logits.float()
            res["rel_logit_err_vs_fp32_twin"] = ((a - b).norm() / b.norm()).item()
            res["fp16_twin_vs_fp32_twin"] = ((c - b).norm() / b.norm()).item()
            res["rel_logit_err_vs_fp16_twin"] = ((a - c).norm() / c.norm()).item()
            res["top1_agreement"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            res["fp16_twin_top1_agreement"] = (c.argmax(-1) == b.argmax(-1)).float().mean().item()
            res["ok"] = (exact == len(awq_mods) == len(stored) and not res["routers_quantized"]
                         and res["rel_logit_err_vs_fp32_twin"] <= max(2e-3, 2 * res["fp16_twin_vs_fp32_twin"]))
        except Exception as e:  # noqa: BLE001 -- recorded per job
            import traceback

            res["error"] = f"{type(e).__name__}: {e}"[:500]
            res["traceback"] = traceback.format_exc()[-1500:]
            res["ok"] = False
        out["jobs"].append(res)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    ap.add_argument("--python", default=DEFAULT_PYTHON, help="GPTQModel's interpreter")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("GPTQMODEL_RESULT " + json.dumps(child(Path(args.child))))
        return 0
    import torch

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gm_awq_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = prepare(args.settings.split(","), work)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()
    job_file = work / "jobs.json"
    job_file.write_text(json.dumps({"input_ids": ids, "jobs": jobs}))
    t1 = time.perf_counter()
    proc = subprocess.run([args.python, __file__, "--child", str(job_file)], capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("GPTQMODEL_RESULT ")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
        return 1
    result = json.loads(line.removeprefix("GPTQMODEL_RESULT "))
    result["prepare_s"], result["child_s"] = round(t1 - t0, 1), round(time.perf_counter() - t1, 1)
    for r in result["jobs"]:
        r.pop("traceback", None) if r["ok"] else None
        print(json.dumps(r))
    print(json.dumps({k: v for k, v in result.items() if k != "jobs"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] for r in result["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
