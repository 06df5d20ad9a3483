"""Child of ``gptqmodel_interop.py``: load GPTQ checkpoints with GPTQModel and report what it built.

Runs in GPTQModel's own virtual environment (torch >= 2.14; see benchmarks/README.md) and must not
import moecompress. Reads a JSON job file written by the driver::

    {"dtype": "float16", "backend": "gptq_torch", "input_ids": [[...], ...],
     "jobs": [{"name": ..., "model": Q_DIR, "twin": Q_DEQ_DIR, "logits": OUT.safetensors,
               "bypass_asym_guard": false}, ...]}

and for every job, in this one process (each job isolated by try/except):

* ``GPTQModel.load(model, device="cpu", backend=..., dtype=...)``; a failure is recorded with its
  exception type, message and traceback tail (``bypass_asym_guard``: see ``asym_guard_bypassed``);
* the module type of every linear-like module in the decoder layers, the quantized ones
  (GPTQModel's quantized-linear base class) and the float ones; for every router
  (``...gate`` / ``...shared_expert_gate``): its type, what the checkpoint's ``dynamic`` rules say
  for it (``QuantizeConfig.dynamic_get`` returns ``False`` for a negative match) and whether its
  weight equals the checkpoint's (cast to the load dtype);
* a key audit: checkpoint tensors the model has no slot for (``unexpected``: silently dropped by
  accelerate's ``load_checkpoint_in_model``) and persistent model tensors the checkpoint lacks
  (``missing``: left at their initial values);
* float tensors compared with the checkpoint, and every quantized module's ``dequantize_weight()``
  (GPTQModel's own unpacking, after its v1 -> v2 zero-point conversion) compared with the
  dequantized twin the driver wrote with moecompress's reader, rounded to the load dtype; with fp16
  scales and integer codes a single rounding makes both exact, so any difference is a format bug;
* logits of one forward on the fixed ``input_ids``, saved as float32 to ``logits``.

The result is printed as one line ``GPTQMODEL_RESULT <json>`` and written to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import traceback
from pathlib import Path

ROUTER_RE = re.compile(r"\.(gate|shared_expert_gate)$")
# checkpoint-side names of runtime modules (Mixtral keeps the original HF names on disk)
ALIASES = ((".mlp.", ".block_sparse_moe."), (".gate_proj", ".w1"), (".up_proj", ".w3"), (".down_proj", ".w2"))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("gptqmodel", "torch", "transformers", "accelerate", "defuser", "safetensors", "triton"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def checkpoint_name(name: str, keys) -> str | None:
    """The checkpoint spelling of runtime tensor ``name`` (exact, else through the Mixtral aliases)."""
    if name in keys:
        return name
    alt = name
    for runtime, disk in ALIASES:
        alt = alt.replace(runtime, disk)
    return alt if alt in keys else None


@contextlib.contextmanager
def asym_guard_bypassed(active: bool):
    """Diagnostic only: let GPTQModel load an asymmetric GPTQ v1 checkpoint it did not write.

    GPTQModel refuses ``sym=False`` with ``checkpoint_format "gptq"`` unless ``meta.quantizer`` names
    gptqmodel >= 0.9.0 (``QuantizeConfig.is_quantized_by_gptaq``), because AutoGPTQ's v1 zero points
    underflowed. With the check answered ``True`` for this one load, its v1 -> v2 conversion runs on
    our zero points, and the weight comparison shows whether they survive it. The checkpoint is not
    changed.
    """
    if not active:
        yield
        return
    from gptqmodel.quantization.config import QuantizeConfig

    owner = next(c for c in QuantizeConfig.__mro__ if "is_quantized_by_gptaq" in vars(c))
    original = vars(owner)["is_quantized_by_gptaq"]
    owner.is_quantized_by_gptaq = lambda self: True
    try:
        yield
    finally:
        owner.is_quantized_by_gptaq = original


def run_job(job: dict, dtype, backend, input_ids, torch) -> dict:
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from safetensors.torch import save_file

    res: dict = {"name": job["name"], "model": job["model"], "loaded": False}
    t0 = time.perf_counter()
    try:
        with asym_guard_bypassed(job.get("bypass_asym_guard", False)):
            qm = GPTQModel.load(job["model"], device="cpu", backend=backend, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        res["error"] = {"type": type(e).__name__, "message": str(e)[:4000],
                        "traceback": traceback.format_exc()[-4000:]}
        return res
    res["asym_guard_bypassed"] = bool(job.get("bypass_asym_guard"))
    res["loaded"] = True
    res["load_s"] = time.perf_counter() - t0
    model = qm.model.eval()
    qcfg = qm.quantize_config
    res["quantize_config"] = {"bits": qcfg.bits, "group_size": qcfg.group_size, "desc_act": qcfg.desc_act,
                              "sym": qcfg.sym, "format": str(getattr(qcfg, "format", None)),
                              "runtime_format": str(getattr(qcfg, "runtime_format", None)),
                              "dynamic": qcfg.dynamic}

    ckpt = read_tensors(Path(job["model"]))
    twin = read_tensors(Path(job["twin"])) if job.get("twin") else {}

    # ---- module types
    quant, floats, routers, kernels = [], [], {}, set()
    for name, mod in model.named_modules():
        if name.endswith("lm_head"):
            res["lm_head"] = {"name": name, "type": type(mod).__name__, "quantized": isinstance(mod, BaseQuantLinear)}
            if isinstance(mod, BaseQuantLinear):  # compared with the twin below like every quantized module
                quant.append(name)
                kernels.add(type(mod).__name__)
        if ".layers." not in name:
            continue
        if isinstance(mod, BaseQuantLinear):
            quant.append(name)
            kernels.add(type(mod).__name__)
        elif isinstance(mod, torch.nn.Linear):
            floats.append(name)
        if ROUTER_RE.search(name) and hasattr(mod, "weight") and isinstance(getattr(mod, "weight"), torch.Tensor):
            disk = checkpoint_name(name + ".weight", ckpt)
            w = mod.weight.detach()
            routers[name] = {
                "type": type(mod).__name__,
                "quantized": isinstance(mod, BaseQuantLinear),
                "dynamic_get": qcfg.dynamic_get(layer_name=name) if qcfg.dynamic else None,
                "checkpoint_name": disk,
                "dtype": str(w.dtype),
                "equal_to_checkpoint": (disk is not None
                                        and torch.equal(w.cpu(), ckpt[disk].to(w.dtype))),
            }
    res["kernels"] = sorted(kernels)
    res["n_quantized_modules"] = len(quant)
    res["float_linears"] = floats
    res["routers"] = routers
    res["routers_ok"] = bool(routers) and all(
        not r["quantized"] and r["dynamic_get"] is False and r["equal_to_checkpoint"] for r in routers.values())

    # ---- key audit
    state = model.state_dict()
    mapped = {}
    for k in state:
        disk = checkpoint_name(k, ckpt)
        if disk is not None:
            mapped[k] = disk
    res["missing"] = sorted(k for k in state if k not in mapped)
    res["unexpected"] = sorted(set(ckpt) - set(mapped.values()))

    # ---- stored tensors as loaded (qzeros differ by design: GPTQModel converts v1 to v2 in place)
    mismatched = []
    for k, disk in mapped.items():
        if k.endswith(".qzeros"):
            continue
        a, b = state[k].cpu(), ckpt[disk]
        if a.is_floating_point() and b.is_floating_point():
            b = b.to(a.dtype)
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            mismatched.append(k)
    res["tensors_compared"] = len(mapped)
    res["tensors_mismatched"] = mismatched

    # ---- GPTQModel's own dequantization vs our dequantized twin
    if twin:
        worst, worst_name, n_exact, n_cmp, no_twin = 0.0, None, 0, 0, []
        with torch.no_grad():
            for name in quant:
                mod = model.get_submodule(name)
                tname = checkpoint_name(name + ".weight", twin)
                if tname is None:
                    no_twin.append(name)
                    continue
                w = mod.dequantize_weight().t().float().cpu()  # [N, K]
                ref = twin[tname].to(dtype).float()
                if w.shape != ref.shape:
                    no_twin.append(f"{name} (shape {tuple(w.shape)} vs {tuple(ref.shape)})")
                    continue
                d = float((w - ref).abs().max())
                n_cmp += 1
                n_exact += d == 0.0
                if d > worst or worst_name is None:
                    worst, worst_name = d, name
        res["weights"] = {"compared": n_cmp, "exact": n_exact, "max_abs_diff": worst,
                          "worst_module": worst_name, "without_twin": no_twin}

    # ---- forward
    ids = torch.tensor(input_ids, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    res["forward_s"] = time.perf_counter() - t0
    res["logits_dtype"] = str(logits.dtype)
    res["logits_finite"] = bool(torch.isfinite(logits).all())
    save_file({"logits": logits.float().contiguous().cpu()}, job["logits"])
    res["logits"] = job["logits"]
    del qm, model
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", help="JSON job file written by gptqmodel_interop.py")
    ap.add_argument("--out", help="also write the result JSON here")
    args = ap.parse_args()
    spec = json.loads(Path(args.jobs).read_text())

    t0 = time.perf_counter()
    import torch
    from gptqmodel import BACKEND

    dtype = getattr(torch, spec.get("dtype", "float16"))
    backend = BACKEND(spec.get("backend", "gptq_torch"))
    torch.manual_seed(0)
    out = {"versions": versions(), "import_s": time.perf_counter() - t0, "dtype": str(dtype),
           "backend": str(backend), "cuda_available": torch.cuda.is_available(), "results": []}
    for job in spec["jobs"]:
        try:
            out["results"].append(run_job(job, dtype, backend, spec["input_ids"], torch))
        except Exception as e:  # noqa: BLE001 - a crash after loading is reported per job too
            out["results"].append({"name": job["name"], "model": job["model"], "loaded": None,
                                   "error": {"type": type(e).__name__, "message": str(e)[:4000],
                                             "traceback": traceback.format_exc()[-4000:]}})
    text = json.dumps(out, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print("GPTQMODEL_RESULT " + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
