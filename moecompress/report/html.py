"""A self-contained ``report.html``: one file, figures embedded as base64 PNG, no scripts, no network."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from .data import verdict_holds
from .tables import HOW_TO_READ, html_table, settings_line

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.how { background: #f4f7fb; border-left: 4px solid #4a7bd0; padding: .7em 1em; }
.verdict { background: #f5fbf3; border-left: 4px solid #3a9a3a; padding: .5em 1em; }
.verdict.no { background: #fdf4f2; border-left-color: #c8402a; }
table { border-collapse: collapse; font-size: .88em; margin: .6em 0; }
th, td { border: 1px solid #d6d6d6; padding: .3em .55em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:nth-child(2), th:nth-child(2), td:nth-child(3) { text-align: left; }
tr.best td { background: #fff6cf; font-weight: 600; } tr.ref td { background: #f6f6f6; }
td.mark { text-align: center; color: #b8860b; }
img { max-width: 100%; border: 1px solid #e4e4e4; margin: .3em 0; }
.small { color: #666; font-size: .85em; }
"""


def _md_inline(text: str) -> str:
    """The little Markdown the shared texts use: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render(data: dict, plots: dict[str, Path]) -> str:
    parts = [f"<h1>{html.escape(data['title'])}</h1>",
             f"<p class='small'>{_md_inline(settings_line(data))}</p>",
             f"<div class='how'><b>How to read this.</b> {_md_inline(HOW_TO_READ)}</div>"]
    parts[1:1] = [f"<p class='verdict no'><b>Warning.</b> {html.escape(w)}</p>" for w in data.get("warnings") or []]
    if data["verdicts"]:
        parts.append("<h2>Verdict</h2>")
        for v in data["verdicts"]:
            ok = verdict_holds(v)
            parts.append(f"<p class='verdict{'' if ok else ' no'}'>{html.escape(v['line'])}</p>")
    parts += ["<h2>Results</h2>", html_table(data)]
    for title, path in plots.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<img alt='{html.escape(title)}' src='{embed_png(path)}'>")
    if data.get("decisions"):
        rows = "".join(f"<tr><td>{html.escape(d['variant'])}</td><td>{html.escape(d['step'])}</td>"
                       f"<td>{html.escape(d['action'])}</td><td>{html.escape(str(d['reason']))}</td>"
                       f"<td>{'' if d.get('seconds') is None else d['seconds']}</td></tr>" for d in data["decisions"])
        parts.append("<details><summary>What the last run did</summary><table><tr><th>variant</th><th>step</th>"
                     f"<th>action</th><th>reason</th><th>seconds</th></tr>{rows}</table></details>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(data['title'])}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
