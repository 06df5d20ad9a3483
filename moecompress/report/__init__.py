"""`moecompress report RUN_DIR`: the accuracy (and speed) report of a run folder.

Writes ``report.json`` (every variant's key numbers, the Pareto fronts, the verdicts), ``report.md``
and a self-contained ``report.html`` (figures embedded), and the figures under ``plots/``. Without
matplotlib (the ``report`` extra) the tables are still written, without figures.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .data import load_run, pareto_front, report_data, verdicts

__all__ = ["write_report", "summary_text", "open_in_browser", "report_data", "load_run", "pareto_front", "verdicts"]

log = logging.getLogger("moecompress.report")
FORMATS = ("md", "html")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | Path, formats: list[str] | None = None) -> dict:
    """Write the report files of ``run_dir``; returns the report data (plus ``files``)."""
    from . import html as html_page
    from .tables import markdown

    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    data = report_data(run_dir, loaded)
    evals = loaded[1]
    for w in data["warnings"]:
        log.warning("report: %s", w)
    if formats is None:
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        formats = ((info.get("recipe") or {}).get("report") or {}).get("formats") or list(FORMATS)
    try:
        from .plots import make_plots

        plots = make_plots(data, evals, run_dir / "plots")
    except ImportError as e:
        log.warning("report: no figures (%s); pip install 'moecompress[report]' for them", e)
        plots = {}
    data["plots"] = {title: str(p.relative_to(run_dir)) for title, p in plots.items()}
    # every file's text first, then the files: a failure leaves the previous report whole, not half replaced
    texts = {"json": json.dumps(data, indent=2, default=str) + "\n"}
    if "md" in formats:
        texts["md"] = markdown(data, data["plots"])
    if "html" in formats:
        texts["html"] = html_page.render(data, plots)
    files = {kind: run_dir / f"report.{kind}" for kind in texts}
    for kind, text in texts.items():
        _write(files[kind], text)
    for kind in FORMATS:  # an earlier report's page in a format no longer asked for would be out of date
        old = run_dir / f"report.{kind}"
        if kind not in texts and old.is_file():
            old.unlink()
            log.info("report: removed %s (report.formats no longer names %s)", old, kind)
    data["files"] = {k: str(v) for k, v in files.items()}
    return data


def open_in_browser(path: str | Path) -> bool:
    """Open a report in the default browser; False (and nothing happens) where there is none.

    On Linux without a display nothing is tried: webbrowser would fall back to a console browser
    (lynx, w3m) and take over the terminal."""
    import sys
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return bool(webbrowser.open(Path(path).resolve().as_uri()))
    except webbrowser.Error:
        return False


def summary_text(data: dict) -> str:
    """What a terminal shows after a run: the headline table, the verdicts, where the report is."""
    from .tables import text_table

    lines = [data["title"], "", text_table(data), "", "◆ Pareto front (size vs KL)   ★ best at its size"]
    if data["verdicts"]:
        lines += [""] + ["verdict " + v["line"] for v in data["verdicts"]]
    files = data.get("files") or {}
    where = files.get("html") or files.get("md") or files.get("json")
    if where:
        lines += ["", f"report: {where}"]
    return "\n".join(lines)
