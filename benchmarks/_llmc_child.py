"""llm-compressor side of benchmarks/vs_llmcompressor*.py: GPTQ or AWQ W{bits}A16 with ``oneshot`` on given windows.

Runs inside the llm-compressor virtual environment (see benchmarks/README.md) and must not import
moecompress. The calibration windows come from the driver as a safetensors file holding one LongTensor
``input_ids [n_samples, seq_len]``; they are fed unchanged (no shuffling, no truncation, no padding)
as a ``datasets.Dataset`` of ``input_ids`` / ``attention_mask``. Prints one JSON line (prefixed
``LLMC_RESULT``) with the timings, the peak RSS of this process, the sha256 of the windows fed and
the versions used.

    /work/llmc-venv/bin/python benchmarks/_llmc_child.py --model DIR --out DIR --windows FILE \
        --bits 4 --group-size 128 [--batch-size 8] [--actorder static] [--dtype float32]
        [--method awq --asym]

    /work/llmc-venv/bin/python benchmarks/_llmc_child.py --check QUANT_DIR --against DENSE_DIR

``--check``: decompress every packed module of the compressed-tensors checkpoint QUANT_DIR with
compressed-tensors' own ``PackedQuantizationCompressor.decompress`` (module by module, no model) and
compare it with the ``.weight`` of the same name in the dense float checkpoint DENSE_DIR (what
moecompress's reader wrote); prints ``LLMC_CHECK {json}``. transformers (5.17 here, 5.25 in the main
venv) cannot load asymmetric compressed-tensors checkpoints with fused experts at all ("Asymmetric
quant requires zero-point values" in its expert conversion), so this is the independent reading of
asymmetric outputs.

``--method gptq`` (the default): ``GPTQModifier`` as described in vs_llmcompressor.py.
``--method awq``: ``AWQModifier`` (``llmcompressor.modifiers.transform.awq``; its defaults: the mappings
llm-compressor registers for the architecture -- for ``Qwen3MoeForCausalLM`` ``_moe_default_mappings``,
whose post-attention group balances the router ``mlp.gate`` together with every expert's
``gate_proj``/``up_proj`` -- ``duo_scaling=True``, ``n_grid=20``) followed by a ``QuantizationModifier``
with the same targets/ignore as the GPTQ recipe: scheme ``W4A16_ASYM`` at W4 g128 asymmetric, an
explicit int/group ``config_groups`` otherwise (e.g. W3 g64 asymmetric). This is the two-modifier
form that llm-compressor's deprecated ``llmcompressor.modifiers.awq.AWQModifier(scheme=...)`` shim
expands to.

MoE experts: Qwen3-MoE experts are fused 3D parameters in transformers 5. The model is loaded under
``llmcompressor.modeling.moe.linearize.load_quantizable_moe`` (the mechanism llm-compressor
documents for MoE models), which swaps ``Qwen3MoeExperts`` for ``LinearExperts2D`` -- one
``gate_proj/up_proj/down_proj`` ``nn.Linear`` per expert -- and loads the per-expert checkpoint
tensors straight into them. ``oneshot``'s default ``moe_calibrate_all_experts=True`` then runs every
expert on every token during calibration (only the routed outputs are kept), so each expert's
Hessian is built from all calibration tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T_START = time.perf_counter()

from _child_util import vm_hwm, windows_sha256  # noqa: E402 - this folder


def drop_broken_aliases() -> list[str]:
    """Work around a transformers 5.15-5.17 bug that breaks ``load_quantizable_moe`` without torchvision.

    transformers registers lazy alias modules ``transformers.models.<m>.image_processing_<m>_fast`` (and
    ``transformers.image_processing_utils_fast``) whose ``dir()`` imports the real image processor;
    ``transformers.monkey_patching.apply_patches`` -- which ``load_quantizable_moe`` uses to swap the
    experts class -- calls ``dir()`` on every ``transformers.*`` module, so without torchvision the load
    dies with ``ModuleNotFoundError: torchvision``. (PyPI's torchvision wheels are CUDA builds that do
    not import next to the CPU torch wheel.) The aliases only exist for backward-compatible imports
    of image processors; dropping them from ``sys.modules`` changes nothing else. Fixed upstream:
    transformers 5.23 has no such aliases.
    """
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return []
    names = [n for n, m in list(sys.modules.items())
             if n.startswith("transformers.") and n.endswith("_fast") and getattr(m, "__file__", "") is None]
    for n in names:
        del sys.modules[n]
    return names


def skip_pinning_without_accelerator() -> bool:
    """Work around llm-compressor 0.14.0.1's AWQ on a CPU-only torch: make cache pinning a no-op.

    ``AWQModifier._apply_smoothing`` pins every cached batch (``IntermediatesCache.pin_memory``, "for
    faster onloading during grid search"); on a torch without an accelerator ``Tensor.pin_memory()``
    raises ``RuntimeError: Cannot access accelerator device when none is available``. Pinning only
    speeds up host-to-device copies; with everything on the CPU there are none, so skipping it changes
    no number. Returns whether the patch was applied.
    """
    import torch

    if torch.accelerator.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def scheme_kwargs(args) -> dict:
    """``scheme=`` for llm-compressor's preset of this setting, else an explicit int/group ``config_groups``."""
    presets = {(4, 128, True): "W4A16", (4, 128, False): "W4A16_ASYM"}
    preset = presets.get((args.bits, args.group_size, not args.asym))
    if preset:
        return {"scheme": preset}
    weights = dict(num_bits=args.bits, type="int", symmetric=not args.asym, strategy="group",
                   group_size=args.group_size, dynamic=False)
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def recipe(args):
    ignore = ["lm_head", "re:.*mlp.gate$"]  # routers (Qwen3MoeTopKRouter is no Linear anyway) and the head
    if args.method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(duo_scaling=True, n_grid=args.awq_grid),
                QuantizationModifier(targets="Linear", ignore=ignore, **scheme_kwargs(args))]

    from llmcompressor.modifiers.gptq import GPTQModifier

    common = dict(targets="Linear", ignore=ignore, block_size=args.block_size, dampening_frac=args.damp)
    if args.actorder != "default":
        common["actorder"] = None if args.actorder == "none" else args.actorder
    return GPTQModifier(**scheme_kwargs(args), **common)


def check(quant_dir: str, dense_dir: str) -> dict:
    """compressed-tensors' own decompression of every packed module of ``quant_dir`` vs ``dense_dir``'s weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups = json.loads((Path(quant_dir) / "config.json").read_text())["quantization_config"]["config_groups"]
    if len(groups) != 1:
        return {"error": f"{len(groups)} config groups; only one is handled"}
    g = next(iter(groups.values()))
    fields = QuantizationArgs.model_fields
    scheme = QuantizationScheme(targets=g["targets"],
                                weights=QuantizationArgs(**{k: v for k, v in g["weights"].items() if k in fields}))
    ck, dense = {}, {}
    for f in sorted(Path(quant_dir).glob("*.safetensors")):
        ck.update(load_file(str(f)))
    for f in sorted(Path(dense_dir).glob("*.safetensors")):
        dense.update(load_file(str(f)))
    worst, n, missing = 0.0, 0, []
    for key in sorted(k for k in ck if k.endswith(".weight_packed")):
        prefix = key[: -len("_packed")]  # "<module>.weight"
        if prefix not in dense:
            missing.append(prefix)
            continue
        sd = {k[len(prefix) - len("weight"):]: v for k, v in ck.items() if k.startswith(prefix + "_")}
        w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].float()
        worst = max(worst, float((w - dense[prefix].float()).abs().max()))
        n += 1
    return {"modules_compared": n, "max_abs_diff": worst, "missing_in_dense": missing[:5], "n_missing": len(missing)}


def main() -> int:
    if "--check" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--check", required=True)
        ap.add_argument("--against", required=True)
        a = ap.parse_args()
        print("LLMC_CHECK " + json.dumps(check(a.check, a.against)), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", required=True, help="safetensors file with input_ids [n, seq_len]")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--actorder", default="default", help="'default' (llm-compressor's: static), static, none")
    ap.add_argument("--dtype", default="float32", help="dtype the model is loaded (and calibrated) in")
    ap.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    ap.add_argument("--asym", action="store_true", help="asymmetric weights (zero points); default symmetric")
    ap.add_argument("--awq-grid", type=int, default=20, help="AWQModifier n_grid (llm-compressor's default 20)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import get_linearized_moes, load_quantizable_moe

    if args.threads:
        torch.set_num_threads(args.threads)
    pinning_skipped = skip_pinning_without_accelerator() if args.method == "awq" else False
    t_import = time.perf_counter() - T_START
    input_ids = load_file(args.windows)["input_ids"]
    n, seq_len = input_ids.shape
    sha = windows_sha256(input_ids)
    ds = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": torch.ones_like(input_ids).tolist()})

    t0 = time.perf_counter()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    dropped = drop_broken_aliases()
    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(args.model)
    moes = get_linearized_moes(model)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe(args), num_calibration_samples=n,
            max_seq_length=seq_len, batch_size=args.batch_size, shuffle_calibration_samples=False,
            pipeline="sequential", moe_calibrate_all_experts=True)
    t_oneshot = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    t_save = time.perf_counter() - t0

    quantized = sorted(name for name, m in model.named_modules() if getattr(m, "quantization_scheme", None))
    import compressed_tensors
    import llmcompressor
    import transformers

    result = {
        "windows_sha256": sha,
        "n_samples": n,
        "seq_len": seq_len,
        "linearized_moe_modules": len(moes),
        "dropped_transformers_aliases": len(dropped),
        "pin_memory_skipped": pinning_skipped,
        "linearized_moe_class": type(moes[0][1]).__mro__[1].__name__ if moes else None,
        "quantized_modules": len(quantized),
        "quantized_experts": sum(".experts." in q for q in quantized),
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out", "windows")},
        "timings_s": {"imports": t_import, "load": t_load, "oneshot": t_oneshot, "save": t_save,
                      "total": time.perf_counter() - T_START},
        "vm_hwm": vm_hwm(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }
    print("LLMC_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
