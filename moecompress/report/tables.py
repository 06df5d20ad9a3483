"""The results table of a report as Markdown, as HTML cells, and as plain text for the terminal."""

from __future__ import annotations

import html

HOW_TO_READ = (
    "Each row is one version of the model: `reference` is the original checkpoint, the others are "
    "quantized copies of it. **Size** is the checkpoint on disk. **Perplexity** (lower is better) is "
    "measured on held-out text the model never trained on; the percentage is the change from the "
    "reference. **KL** (lower is better, 0 = identical) is how far each variant's next-token "
    "distribution drifts from the reference's, and **top-1** how often both predict the same next token. "
    "The **routing** columns say how often the compressed model sends tokens to the same experts "
    "(top-k exact: the same expert set; Jaccard: overlap of the sets; router KL: drift of the router "
    "probabilities; with zero experts the sets of *real* experts are compared). With zero-expert (skipping) variants, "
    "**skip rate** is the share of expert slots sent to a zero expert, **active experts** the real experts a "
    "token runs per MoE layer and **expert FLOPs** the routed experts' compute relative to the reference. ◆ marks the Pareto front (no other variant is both smaller and closer to the "
    "reference; sizes within 2% count as the same size); ★ and bold mark the best variant (lowest KL) among "
    "variants of the same size."
)


def short(ds: str) -> str:
    return ds.removeprefix("builtin:")


def _num(v, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def _bits(r: dict) -> str:
    """The base bits, and each override's (``3, 8: self_attn``)."""
    if r["bits"] is None:
        return "–"
    return ", ".join([str(r["bits"])] + [f"{o.get('bits') or r['bits']}: {o.get('match')}"
                                         for o in r.get("overrides") or []])


def _group(r: dict) -> str:
    if r["is_reference"] or r["bits"] is None:  # the source, or a variant that is not quantized
        return "–"
    return "channel" if r["group_size"] is None else str(r["group_size"])


def columns(data: dict) -> list[tuple[str, callable]]:
    """``(header, row -> text)`` for every column of the results table."""
    cols = [
        ("variant", lambda r: r["name"]),
        ("method", lambda r: (r["method"] or "?") + (f" (seed {r['calib_seed']})" if r["calib_seed"] is not None else "")),
        ("bits", _bits),
        ("group", _group),
        ("bits/weight", lambda r: _num(r["bits_per_weight"], "{:.2f}")),
        ("size MB", lambda r: _num(r["size_mb"], "{:.2f}")),
    ]
    for d in data["datasets"]:
        cols.append((f"ppl {short(d)}", lambda r, d=d: _ppl(r, d)))
    cols += [
        ("KL", lambda r: _num(r["kl"], "{:.4f}")),
        ("top-1", lambda r: _num(r["top1"], "{:.1%}")),
        ("top-k exact", lambda r: _num(r["topk_exact"], "{:.1%}")),
        ("Jaccard", lambda r: _num(r["jaccard"], "{:.3f}")),
        ("router KL", lambda r: _num(r["router_kl"], "{:.4f}")),
    ]
    if data.get("has_skipping"):
        cols += [("skip rate", lambda r: _num(r["skip_rate"], "{:.1%}")),
                 ("active experts", lambda r: _num(r["active_experts"], "{:.2f}")),
                 ("expert FLOPs", lambda r: _num(r["expert_flops"], "{:.0%}"))]
    if data["has_speed"]:
        cols += [("prefill tok/s", lambda r: _num(r["prefill_tokens_per_s"], "{:,.0f}")),
                 ("decode tok/s", lambda r: _num(r["decode_tokens_per_s"], "{:,.1f}"))]
    return cols


def _ppl(r: dict, d: str) -> str:
    p, pct = r["ppl"].get(d), r["ppl_delta_pct"].get(d)
    if p is None:
        return "–"
    return f"{p:.3f}" if r["is_reference"] or pct is None else f"{p:.3f} ({pct:+.1f}%)"


def marks(r: dict) -> str:
    return ("★" if r["best_at_size"] else "") + ("◆" if r["pareto_size"] else "")


def markdown_table(data: dict) -> str:
    cols = columns(data)
    lines = ["| | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in data["variants"]:
        cells = [f(r) for _, f in cols]
        if r["best_at_size"]:
            cells[0] = f"**{cells[0]}**"
        lines.append(f"| {marks(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def html_table(data: dict) -> str:
    cols = columns(data)
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols) + "</tr>"
    body = []
    for r in data["variants"]:
        cls = " class='best'" if r["best_at_size"] else (" class='ref'" if r["is_reference"] else "")
        cells = "".join(f"<td>{html.escape(f(r))}</td>" for _, f in cols)
        body.append(f"<tr{cls}><td class='mark'>{marks(r)}</td>{cells}</tr>")
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def text_table(data: dict) -> str:
    """The headline numbers, aligned for a terminal."""
    keep = {"variant", "size MB", "KL", "top-1", "top-k exact", "decode tok/s"}
    cols = [(h, f) for h, f in columns(data) if h in keep or h.startswith("ppl ")]
    rows = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in data["variants"]]
    for row, r in zip(rows[1:], data["variants"]):
        row[0] = marks(r).ljust(2) + " " + row[0]
    rows[0][0] = "   " + rows[0][0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def markdown(data: dict, plots: dict[str, str]) -> str:
    """The whole ``report.md`` (``plots``: title -> path relative to the report)."""
    out = [f"# {data['title']}", ""] + [f"> **Warning.** {w}\n" for w in data.get("warnings") or []]
    out += ["**How to read this.** " + HOW_TO_READ, ""]
    if data["verdicts"]:
        out += ["## Verdict", ""] + [f"- {v['line']}" for v in data["verdicts"]] + [""]
    out += ["## Results", "", markdown_table(data), "", settings_line(data), ""]
    for title, path in plots.items():
        out += [f"## {title}", "", f"![{title}]({path})", ""]
    return "\n".join(out)


def settings_line(data: dict) -> str:
    parts = [f"Model: `{data['model']}`" + (f" ({data['family']})" if data.get("family") else "")]
    if data["data"]:
        parts.append("evaluation: " + ", ".join(
            f"{short(k)} {v.get('windows', '?')}×{v.get('seq_len', '?')} tokens" for k, v in data["data"].items()))
    cal = data.get("calibration")
    if cal:
        parts.append(f"calibration: {cal.get('data')} {cal.get('samples')}×{cal.get('seq_len')} tokens")
    if data.get("bench"):
        b = data["bench"]
        parts.append(f"speed: {b.get('device')} {b.get('dtype') or ''} batch {b.get('batch')}".replace("  ", " "))
    return "; ".join(parts) + "."
