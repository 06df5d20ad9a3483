"""What a run reads, checked before any step: its model (a folder, a built-in demo model or a Hub repository),
its run folder, and every step's devices, data and context lengths."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..settings import QuantizeConfig
from .recipe import Recipe, SkipBaseline

# name -> (quick, variant) of the demo model (moecompress.demo_model)
BUILTIN_MODELS = {"builtin:demo": (False, "demo"), "builtin:demo-quick": (True, "demo"),
                  "builtin:demo-wide": (False, "wide")}


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """A recipe's ``model``: a checkpoint folder, or a built-in demo model (built once, cached)."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise UserError(f"unknown built-in model '{spec}'; choose one of {', '.join(BUILTIN_MODELS)}")
        from ..demo_model import demo_model_path

        quick, variant = BUILTIN_MODELS[spec]
        return demo_model_path(cache_dir, quick=quick, variant=variant)
    from ..checkpoint.hub import local_model

    path = Path(local_model(spec)).expanduser()  # a Hub repository id: its fetched snapshot
    if not path.is_dir():
        where = "" if path.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
        raise UserError(f"model {spec} is not a folder" if path.exists() else f"model {spec} does not exist{where}")
    return path.resolve()


def reference_dir(ref: str, model_dir: Path) -> str:
    """A variant's tune_reference as a folder: ``original`` is the recipe's model, a Hub id its snapshot."""
    from ..checkpoint.hub import local_model

    return str(Path(model_dir).resolve()) if ref == "original" else local_model(ref)


def run_folder(recipe: Recipe, out: str | Path | None) -> Path:
    """The run folder (``out``, else the recipe's ``output_dir``); UserError now if it cannot be one."""
    from ..checkpoint.writer import missing_parents

    run_dir = Path(out if out is not None else recipe.output_dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} exists and is not a folder")
    if not run_dir.exists():
        missing_parents(run_dir)
    return run_dir


def check_inputs(recipe: Recipe) -> None:
    """The devices and data of every step, checked before the run folder is made: a mistake would
    otherwise surface only when its step comes (an evaluation's, after every variant was built).
    Data is read, not tokenized."""
    from ..calib.chat import plain
    from ..calib.data import load_texts
    from ..devices import resolve_device

    where: dict[tuple[str, str], str] = {}  # (kind, value) -> the first step using it: each is checked once
    zeda = recipe.zeda_config()
    if zeda is not None:
        where.update({("device", zeda.device): "zeda", ("data", zeda.data): "zeda"})
    for v in recipe.built_variants():
        if isinstance(v.config, QuantizeConfig):
            where.setdefault(("device", v.config.device), f"variant {v.name}")
            if v.config.needs_calibration:
                where.setdefault(("data", v.config.calib), f"variant {v.name}")
        elif isinstance(v.config, SkipBaseline):
            where.setdefault(("data", recipe.calibration.data), f"variant {v.name}")
    where.setdefault(("device", recipe.eval.device), "eval")
    if recipe.bench is not None:
        where.setdefault(("device", recipe.bench.device), "bench")
    for spec in recipe.eval.data:
        where.setdefault(("eval data", spec), "")  # its errors say "eval data" instead
    for (kind, value), step in where.items():
        try:
            if kind == "device":
                resolve_device(value)
            else:
                # a check only: the build renders with the model's template
                load_texts(value, chat=plain, what="eval data" if kind == "eval data" else "calibration text")
        except UserError as e:
            raise UserError(f"{step}: {e}" if step else str(e)) from None
    if recipe.eval.tasks:  # their names (lm-eval's registry), not their datasets
        from ..evals.lm_eval_adapter import task_manager

        try:
            task_manager(list(recipe.eval.tasks), None)
        except UserError as e:
            raise UserError(f"eval: {e}") from None


def check_model(model_dir: Path, run_dir: Path, option: str, recipe: Recipe | None = None) -> None:
    """The run folder and the source model stay apart, and the model is a supported MoE that the
    recipe's steps can take (float if a variant quantizes it; windows within its context)."""
    from ..arch.handle import ModelHandle
    from ..checkpoint.writer import refuse_overlap

    refuse_overlap(model_dir, run_dir, option)
    if run_dir.is_dir() and not (run_dir / "run.json").is_file() and any(run_dir.iterdir()):
        raise UserError(f"{option} {run_dir} holds other files and no run.json: not a moecompress run to "
                        "continue; choose an empty or new folder")
    h = ModelHandle.open(model_dir)  # a non-MoE or unsupported family fails here, not in the first build
    if recipe is None:
        return
    built = [v for v in recipe.built_variants() if isinstance(v.config, QuantizeConfig)]
    q = h.reader.config.get("quantization_config")
    if q and built:
        raise UserError(f"{model_dir} is already quantized ({q.get('quant_method')}); variant {built[0].name} "
                        "would quantize it again: use its float original")
    from ..pipeline import fit_settings

    skeleton = h.skeleton() if built else None
    for v in built:
        try:  # a group size that does not divide a linear fails here, not after the variants before it are built
            fit_settings(h, v.config, skeleton)
        except UserError as e:
            raise UserError(f"variant {v.name}: {e}") from None
        if v.config.needs_calibration:
            h.check_context(v.config.seq_len, f"variant {v.name}: seq_len")
        ref = v.config.tune_reference
        if ref not in (None, "original") and not Path(reference_dir(ref, model_dir)).is_dir():  # (checked in full
            raise UserError(f"variant {v.name}: tune_reference {ref} is not a folder")      # when it builds)
    for v in recipe.built_variants():
        if isinstance(v.config, SkipBaseline):
            h.check_context(v.config.seq_len, f"variant {v.name}: seq_len")
    h.check_context(recipe.eval.seq_len, "eval: seq_len")
