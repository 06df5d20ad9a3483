"""`moecompress run RECIPE.yaml`: build every variant, evaluate it against the source, benchmark it, report.

Layout of a run folder::

    RUN_DIR/run.json               the validated recipe, resolved model path, variant settings
    RUN_DIR/variants/<name>/       each quantized checkpoint (moecompress.json records its settings)
    RUN_DIR/eval/<name>.json       evaluation vs the source model (``reference`` = the source itself)
    RUN_DIR/reference-cache/       the source model's outputs on the evaluation windows, recorded by the
                                   first evaluation and replayed by the others: the source runs once
                                   per run, not once per variant (moecompress.evals.ref_cache)
    RUN_DIR/bench/<name>.json      speed, when the recipe has a ``bench`` section and the runtime exists
    RUN_DIR/report.{json,md,html}, RUN_DIR/plots/*.png

Work already done is skipped, and each decision is logged: a variant is rebuilt only when its saved
settings (``moecompress.json`` ``recipe`` and ``source``) differ from the recipe's; an evaluation or
benchmark is redone only when its settings differ or the checkpoint it measured changed (a stamp of
the folder's file names, sizes and modification times). ``force`` redoes everything.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..calib.specs import specs_stamp
from ..errors import UserError
from ..settings import QuantizeConfig
from .inputs import check_inputs, check_model, reference_dir, resolve_model, run_folder
from .recipe import REFERENCE, Recipe, SkipBaseline, Variant, eval_settings_dict, load_recipe
from .stamps import STAMPED, folder_stamp, same_place, settings_diff
from .stamps import plain as _plain
from .stamps import stamp_changed as _stamp_changed

log = logging.getLogger("moecompress.run")
REFERENCE_CACHE = "reference-cache"  # folder of the run holding the source model's evaluation outputs


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _other_build(saved: dict) -> str | None:
    """How a quantized variant's build of moecompress (``versions`` in its moecompress.json) differs from the
    running one; None when it is the same (or not recorded: baselines, builds from before the record)."""
    from ..build_id import build_id

    was, now = (saved.get("versions") or {}).get("moecompress"), build_id()
    if not isinstance(was, dict) or was == now:
        return None
    return f"another build of moecompress ({was.get('version')}, code {was.get('code')}; now {now['version']}, " \
           f"code {now['code']})"


def write_json(path: Path, data: Any) -> None:
    """Atomically (a finished file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Runner:
    def __init__(self, recipe: Recipe, run_dir: Path, model_dir: Path, force: bool = False,
                 recipe_file: str | None = None, ranks=None):
        from ..distributed import SINGLE

        self.recipe, self.run_dir, self.model_dir, self.force = recipe, run_dir, model_dir, force
        # under torchrun: quantize, ZEDA and eval steps split over the ranks; the rest runs on rank 0 while
        # the others wait, and every step ends on a barrier so all ranks see the same files when deciding the next
        self.ranks = ranks or SINGLE
        self.recipe_file = recipe_file
        # a variant's ``tune_reference: original`` is the recipe's model (its ZEDA variants are tuned toward it)
        # (and a Hub repository id its fetched snapshot)
        self.variants = [v.model_copy(update={"config": v.config.model_copy(
                             update={"tune_reference": reference_dir(v.config.tune_reference, model_dir)})})
                         if isinstance(v.config, QuantizeConfig) and v.config.tune_reference is not None else v
                         for v in recipe.built_variants()]
        self.by_name = {v.name: v for v in self.variants}
        self.zeda = recipe.zeda_config()
        self.zeda_dir = run_dir / "zeda"
        self.decisions: list[dict] = []

    # ------------------------------------------------------------------------------------ build
    def variant_dir(self, name: str) -> Path:
        if name == REFERENCE:
            return self.model_dir
        v = self.by_name.get(name)
        return self.zeda_dir if v is not None and v.config is None else self.run_dir / "variants" / name

    def source_dir(self, v: Variant) -> Path:
        return self.zeda_dir if v.source == "zeda" else self.model_dir

    def build_zeda(self) -> None:
        """The recipe's ZEDA model, once, in RUN_DIR/zeda (rebuilt only when its settings or source change)."""
        from ..zeda.resume import VOLATILE
        from ..zeda.train import run_zeda

        wanted = _plain(self.zeda.model_dump())
        saved = _read_json(self.zeda_dir / "moecompress.json")
        stamps = self._zeda_stamps()
        changed = [what for what, (f, now) in stamps.items() if _stamp_changed(f, now)]
        # how often it logs and saves its training state: not what it trains
        settings = settings_diff({k: v for k, v in ((saved or {}).get("recipe") or {}).items() if k not in VOLATILE},
                                 {k: v for k, v in wanted.items() if k not in VOLATILE})
        if saved is not None and not self.force and not settings and \
                saved.get("source") == str(self.model_dir) and not changed:
            self._write_stamps(stamps.values(), only_missing=True)
            log.info("zeda: skipped (up to date: same settings and source)")
            self._decide("zeda", "zeda", "skipped", "up to date")
            return
        reason = "--force" if saved is not None and self.force else (
            "not built yet" if saved is None else " and ".join(changed) + " changed" if changed
            else f"settings changed: {'; '.join(settings)}" if settings
            else f"source: {saved.get('source')} -> {self.model_dir}")
        log.info("zeda: training (%s)", reason)
        t0 = time.perf_counter()
        # under torchrun every rank trains its share of each batch (DDP, in the process group already up);
        # rank 0 writes
        # a training killed mid-way goes on from its last checkpoint when the settings still match (not under
        # --force), else starts over
        run_zeda(self.model_dir, self.zeda_dir, self.zeda, overwrite=True, resume=not self.force, rates_may_change=False,
                 command=["moecompress", "run", self.recipe_file or "<recipe>", "#", "zeda"])
        self._write_stamps(stamps.values())
        self.ranks.barrier()
        self._decide("zeda", "zeda", "trained", reason, time.perf_counter() - t0)

    def _zeda_stamps(self) -> dict[str, tuple[Path, str]]:
        return {"the source model's files": (self.run_dir / ".zeda.source-stamp", folder_stamp(self.model_dir)),
                "its prompts' text": (self.run_dir / ".zeda.text-stamp", specs_stamp(self.zeda.data))}

    def build(self, v: Variant, i: int, n: int) -> None:
        if v.config is None:  # the ZEDA model itself: built by build_zeda
            log.info("[%d/%d] %s: the ZEDA model, trained above", i, n, v.name)
            return
        out = self.variant_dir(v.name)
        wanted = _plain(v.config.model_dump())
        if isinstance(v.config, SkipBaseline):  # the calibration settings it reads: the text and the seed
            wanted["calibration"] = _plain(self.recipe.calibration.model_dump(include={"data", "seed"}))
        tag = f"[{i}/{n}] {v.name}"
        saved = _read_json(out / "moecompress.json")
        if saved is None:
            reason = "not built yet" if not out.exists() else "incomplete or unreadable moecompress.json"
        elif self.force:
            reason = "--force"
        else:
            defaults = QuantizeConfig().model_dump() if isinstance(v.config, QuantizeConfig) else {}
            recorded = dict(saved.get("recipe") or {})
            cal = recorded.get("calibration")
            if isinstance(cal, dict) and "calibration" in wanted:  # (a baseline built when it recorded them all)
                recorded["calibration"] = {k: x for k, x in cal.items() if k in wanted["calibration"]}
            settings = settings_diff(recorded, wanted, defaults)
            source = self.source_dir(v).resolve()
            stamps = self._build_stamps(v)
            changes = [f"settings changed: {'; '.join(settings)}"] if settings else []
            if not same_place(saved.get("source"), self._place(source)):
                changes.insert(0, f"source: {saved.get('source')} -> {source}")
            # (a from-zeda build without a source stamp predates them: the ZEDA model may have been retrained)
            elif _stamp_changed(*stamps["source"], missing=v.source == "zeda"):
                changes.insert(0, "source: the ZEDA model was trained again" if v.source == "zeda"
                               else f"source: the files of {source} changed")
            if _stamp_changed(*stamps["text"]):
                changes.insert(0, "the calibration text changed")
            if not changes:
                self._write_stamps(stamps.values(), only_missing=True)
                log.info("%s: build skipped (up to date: same settings and source)", tag)
                other = _other_build(saved)
                if other:  # kept (rebuilding on every code change would redo whole runs), but said
                    log.warning("%s: built by %s: kept, though this build could write other bytes; --force "
                                "rebuilds it", tag, other)
                self._decide(v.name, "build", "skipped", "up to date" + (f" (built by {other})" if other else ""))
                return
            reason = "; ".join(changes)
        log.info("%s: building (%s)", tag, reason)
        t0 = time.perf_counter()
        command = ["moecompress", "run", self.recipe_file or "<recipe>", "#", v.name]
        stamps = self._build_stamps(v)  # what the build reads, fingerprinted before it reads it
        summary = self._make(v, out, command, wanted)
        self._write_stamps(stamps.values())
        self.ranks.barrier()
        dt = time.perf_counter() - t0
        if summary is not None and "size_bytes" in summary:
            log.info("%s: built in %.1fs (%.2f MB)", tag, dt, summary["size_bytes"] / 1e6)
        self._decide(v.name, "build", "built", reason, dt)

    def _calib_specs(self, v: Variant) -> tuple[str, ...]:
        """The text a build of ``v`` reads (none for RTN)."""
        if isinstance(v.config, SkipBaseline):
            return (self.recipe.calibration.data,)
        return (v.config.calib,) if isinstance(v.config, QuantizeConfig) and v.config.needs_calibration else ()

    def _build_stamps(self, v: Variant) -> dict[str, tuple[Path, str]]:
        """What a build of ``v`` reads, ``{what: (stamp file, fingerprint now)}``: the source folder's files (the
        model edited in place, a ZEDA model trained again) and the calibration text."""
        base = self.run_dir / "variants"
        return {"source": (base / f".{v.name}.source-stamp", folder_stamp(self.source_dir(v))),
                "text": (base / f".{v.name}.text-stamp", specs_stamp(*self._calib_specs(v)))}

    def _write_stamps(self, stamps, only_missing: bool = False) -> None:
        """Record what a step read (``only_missing``: a step done by an older version, recorded from now on).
        Atomically: under torchrun the other ranks may be reading the file to decide the same step."""
        if self.ranks.main:
            for f, now in stamps:
                if not (only_missing and f.is_file()):
                    f.parent.mkdir(parents=True, exist_ok=True)
                    tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
                    tmp.write_text(now + "\n")
                    os.replace(tmp, f)

    def _make(self, v: Variant, out: Path, command: list[str], wanted: dict) -> dict | None:
        from ..distributed import SINGLE

        split = isinstance(v.config, QuantizeConfig)
        if not self.ranks.main and not split:
            return None  # rank 0 builds it alone
        if isinstance(v.config, SkipBaseline):
            from ..zero.baselines import make_baseline

            c, cal = v.config, self.recipe.calibration
            rec = make_baseline(self.model_dir, out, c.rule, c.target, calib=cal.data, samples=c.samples,
                                seq_len=c.seq_len, seed=cal.seed, overwrite=out.exists(), command=command,
                                recipe=wanted)
            return rec
        from ..pipeline import quantize

        # a build killed mid-way goes on from its last finished layer (the same bytes as a build from scratch)
        # (or, its settings or source changed, or under --force, starts over)
        return quantize(self.source_dir(v), out, v.config, overwrite=True, command=command,
                        ranks=self.ranks if split else SINGLE, resume=not self.force)

    # --------------------------------------------------------------------------------- evaluate
    def evaluate(self, name: str, i: int, n: int) -> None:
        model = self.variant_dir(name)
        path = self.run_dir / "eval" / f"{name}.json"
        stamp = {"settings": eval_settings_dict(self.recipe), "model": self._place(model), "model_stamp": folder_stamp(model),
                 "reference": str(self.model_dir), "reference_stamp": folder_stamp(self.model_dir),
                 "text_stamp": specs_stamp(*self.recipe.eval.data)}
        tag = f"[{i}/{n}] {name}"
        reason = self._needed(name, "eval", "evaluation", path, stamp, tag)
        if reason is None:
            return
        evaluate = _evaluator()
        ev = self.recipe.eval
        log.info("%s: evaluating (%s)", tag, reason)
        t0 = time.perf_counter()
        from ..distributed import SINGLE

        ranks = SINGLE if ev.tasks else self.ranks  # lm-eval tasks run on rank 0 alone
        result = None
        if ranks.active or self.ranks.main:
            result = evaluate(str(model), str(self.model_dir), data=list(ev.data), samples=ev.samples,
                              seq_len=ev.seq_len, batch_size=ev.batch_size, seed=ev.seed, low_memory=ev.low_memory,
                              device=ranks.device(ev.device), tasks=ev.tasks,
                              reference_cache=self.run_dir / REFERENCE_CACHE, ranks=ranks)
        if self.ranks.main:
            write_json(path, dict(result, run_stamp=stamp))
        self.ranks.barrier()
        if not self.ranks.main:
            self._decide(name, "eval", "evaluated", reason, time.perf_counter() - t0)
            return
        result = dict(result, run_stamp=stamp)
        dt = time.perf_counter() - t0
        ppl = ", ".join(f"{k} {v:.3f}" for k, v in (result.get("ppl") or {}).items())
        log.info("%s: evaluated in %.1fs (ppl %s; KL %.4f)", tag, dt, ppl, result.get("kl") or 0.0)
        self._decide(name, "eval", "evaluated", reason, dt)

    # ------------------------------------------------------------------------------------ bench
    def bench(self, name: str, benchmark: Callable, i: int, n: int) -> None:
        model = self.variant_dir(name)
        b = self.recipe.bench
        path = self.run_dir / "bench" / f"{name}.json"
        stamp = {"settings": b.model_dump(), "model": self._place(model), "model_stamp": folder_stamp(model)}
        tag = f"[{i}/{n}] {name}"
        reason = self._needed(name, "bench", "benchmark", path, stamp, tag)
        if reason is None:
            return
        log.info("%s: benchmarking on %s (%s)", tag, b.device, reason)
        t0 = time.perf_counter()
        if not self.ranks.main:  # rank 0 measures alone
            self.ranks.barrier()
            return
        result = benchmark(str(model), device=b.device, prompt_len=b.prompt_len, new_tokens=b.new_tokens,
                           batch=b.batch, dtype=b.dtype, repeats=b.repeats)
        write_json(path, dict(result, run_stamp=stamp))
        self.ranks.barrier()
        log.info("%s: %.0f prefill / %.1f decode tokens/s", tag, result.get("prefill_tokens_per_s") or 0,
                 result.get("decode_tokens_per_s") or 0)
        self._decide(name, "bench", "measured", reason, time.perf_counter() - t0)

    def _needed(self, name: str, step: str, what: str, path: Path, stamp: dict, tag: str) -> str | None:
        """Why ``step`` must run for ``name`` (None: up to date, and the skip is logged and recorded)."""
        reason = self._stale(path, stamp)
        if reason is None:
            saved = _read_json(path)
            old = saved.get("run_stamp") or {}
            if self.ranks.main and any(k not in old for k in stamp):  # recorded from now on
                write_json(path, dict(saved, run_stamp=dict(old, **{k: v for k, v in stamp.items() if k not in old})))
            log.info("%s: %s skipped (up to date)", tag, what)
            self._decide(name, step, "skipped", "up to date")
        return reason

    def _stale(self, path: Path, stamp: dict) -> str | None:
        """Why ``path`` must be (re)computed, or None when it is up to date."""
        if self.force:
            return "--force"
        saved = _read_json(path)
        if saved is None:
            return "no result yet" if not path.exists() else "unreadable result"
        old = saved.get("run_stamp") or {}
        if old.get("settings") != _plain(stamp["settings"]):
            return "settings changed: " + "; ".join(settings_diff(old.get("settings") or {}, _plain(stamp["settings"])))
        # (a stamp the result lacks came in with a newer version: adopted by _needed, not a change)
        changed = [k.removesuffix("_stamp") for k in stamp if k.endswith("_stamp") and k in old and old[k] != stamp[k]]
        if changed or not same_place(old.get("model"), stamp["model"]):
            return " and ".join(STAMPED.get(c, c) for c in changed or ["model"]) + " changed"
        return None

    def _place(self, path: Path) -> str:
        """``path`` as a stamp records it: inside the run folder relative to it (a run folder moved or copied
        keeps its work), elsewhere absolute."""
        try:
            return str(Path(path).resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)

    def _decide(self, name, step, action, reason, seconds=None):
        self.decisions.append({"variant": name, "step": step, "action": action, "reason": reason,
                               "seconds": None if seconds is None else round(seconds, 2)})

    # -------------------------------------------------------------------------------------- all
    def run(self) -> dict:
        t_start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._note_strays()
        if self.force and self.ranks.main:  # everything again: the source model's outputs too, not their recording
            shutil.rmtree(self.run_dir / REFERENCE_CACHE, ignore_errors=True)
        self.ranks.barrier()
        names = [REFERENCE] + [v.name for v in self.variants]
        n = len(self.variants)
        log.info("run %s: %d variants of %s", self.run_dir, n, self.model_dir)
        if self.ranks.main:
            write_json(self.run_dir / "run.json", self._run_info(0.0))  # a partial run can be reported too
        self.ranks.barrier()
        if self.zeda is not None:
            self.build_zeda()
        for i, v in enumerate(self.variants, 1):
            self.build(v, i, n)
        for i, name in enumerate(names, 1):
            self.evaluate(name, i, len(names))
        if self.recipe.bench is not None:
            benchmark = find_benchmark()
            if benchmark is None:
                log.warning("bench: skipped (this install has no runtime benchmark: moecompress.runtime)")
            else:
                for i, name in enumerate(names, 1):
                    self.bench(name, benchmark, i, len(names))
        info = self._run_info(time.perf_counter() - t_start)
        if self.ranks.main:
            write_json(self.run_dir / "run.json", info)
        return info

    def _run_info(self, seconds: float) -> dict:
        return {"recipe_file": self.recipe_file, "recipe": self.recipe.model_dump(), "model": self.recipe.model,
                "model_path": str(self.model_dir), "reference": REFERENCE,
                "variants": [{"name": v.name, "source": v.source, "checkpoint": self._place(self.variant_dir(v.name)),
                              "config": ({"method": "zeda"} if v.config is None
                                         else dict(v.config.model_dump(), source=v.source))}
                             for v in self.variants],
                "decisions": self.decisions, "seconds": round(seconds, 1)}

    def _note_strays(self) -> None:
        known = {v.name for v in self.variants}
        if self.zeda is None and self.zeda_dir.is_dir():
            log.info("note: zeda/ is not in the recipe (no zeda section): left alone, not reported")
        for d in ("variants", "eval", "bench"):
            for p in sorted((self.run_dir / d).glob("*")) if (self.run_dir / d).is_dir() else []:
                if p.name.startswith("."):
                    continue
                stem = p.name if d == "variants" else p.stem
                if stem not in known and stem != REFERENCE:
                    log.info("note: %s is not in the recipe: left alone, not reported", p.relative_to(self.run_dir))


def _evaluator():
    try:
        from ..evals.evaluate import evaluate
    except ImportError as e:
        raise UserError(f"the evaluator (moecompress.evals.evaluate) cannot be imported: {e}") from None
    return evaluate


def find_benchmark() -> Callable | None:
    """The runtime's ``benchmark(model_dir, device, prompt_len, new_tokens, batch)``, if installed."""
    for mod in ("moecompress.runtime.bench", "moecompress.runtime.benchmark", "moecompress.runtime"):
        try:
            fn = getattr(importlib.import_module(mod), "benchmark", None)
        except ImportError:
            continue
        if callable(fn):
            return fn
    return None


def run_recipe(recipe: Recipe | str | Path, *, out: str | Path | None = None, force: bool = False,
               cache_dir: str | Path | None = None, report: bool = True, ranks=None) -> Path:
    """Run a recipe (a :class:`Recipe` or a YAML file) and write its report; returns the run folder."""
    recipe_file = None
    if not isinstance(recipe, Recipe):
        recipe_file = str(recipe)
        recipe = load_recipe(recipe)
    run_dir = run_folder(recipe, out)
    check_inputs(recipe)
    if ranks is not None and ranks.active and not ranks.main:
        ranks.barrier()  # rank 0 resolves (and may build) the model first
    model_dir = resolve_model(recipe.model, cache_dir)
    if ranks is not None and ranks.active and ranks.main:
        ranks.barrier()
    check_model(model_dir, run_dir, "--out" if out is not None else "output_dir", recipe)
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    Runner(recipe, run_dir, model_dir, force=force, recipe_file=recipe_file, ranks=ranks).run()
    if ranks is not None and not ranks.main:
        return run_dir
    if report:
        from ..report import write_report

        write_report(run_dir)
    return run_dir
