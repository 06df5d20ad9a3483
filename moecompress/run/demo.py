"""`moecompress demo`: build the demo model once, run the shipped demo recipe, print the headline.

The recipes ship twice over one file: ``recipes/`` at the top of the repository is installed as the
package data ``moecompress.recipes`` (package-dir mapping in pyproject.toml), so the demo runs the
same way from a checkout and from a pip install.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("moecompress.run")


def recipe_text(name: str) -> str:
    """The text of a shipped recipe (``demo.yaml``, ``demo-quick.yaml``)."""
    try:
        return (resources.files("moecompress.recipes") / name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        repo = Path(__file__).resolve().parents[2] / "recipes" / name  # a checkout installed without the mapping
        if repo.is_file():
            return repo.read_text(encoding="utf-8")
        raise UserError(f"the shipped recipe {name} is missing from this install") from None


def demo_recipe(quick: bool = False):
    import yaml

    from .recipe import parse_recipe

    name = "demo-quick.yaml" if quick else "demo.yaml"
    return parse_recipe(yaml.safe_load(recipe_text(name)), f"moecompress/recipes/{name}")


def run_demo(*, quick: bool = False, out: str | Path | None = None, cache_dir: str | Path | None = None,
             force: bool = False) -> dict:
    """Run the demo; returns the report data, with ``timings_s`` (model, run, total) added."""
    from ..report import write_report
    from .inputs import resolve_model, run_folder
    from .runner import run_recipe

    t0 = time.perf_counter()
    recipe = demo_recipe(quick)
    run_folder(recipe, out)  # a bad --out fails now, not after the model is built
    resolve_model(recipe.model, cache_dir)  # builds the demo model the first time (--cache checked first)
    t_model = time.perf_counter() - t0
    log.info("demo model ready (%.0fs)", t_model)
    run_dir = run_recipe(recipe, out=out, force=force, cache_dir=cache_dir, report=False)
    data = write_report(run_dir)
    total = time.perf_counter() - t0
    data["timings_s"] = {"model": round(t_model, 1), "run": round(total - t_model, 1), "total": round(total, 1)}
    return data
