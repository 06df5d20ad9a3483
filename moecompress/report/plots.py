"""The report's figures (matplotlib, Agg backend: no display needed). Each function writes one PNG.

* accuracy vs size (perplexity on the first dataset, KL), the Pareto front drawn as a step line;
* accuracy vs decode speed, when benchmarks exist;
* accuracy vs routed-expert FLOPs, a curve per skipping rule, when zero-expert variants exist;
* per-layer routing agreement, a line per variant;
* expert load, layers x experts: the reference, one compressed variant, and their difference.
"""

from __future__ import annotations

from pathlib import Path

from .data import pareto_front
from .tables import short

DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(data: dict) -> dict[str, str]:
    cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    out, k = {}, 0
    for r in data["variants"]:
        if r["is_reference"]:
            out[r["name"]] = "#000000"
        else:
            out[r["name"]] = cycle[k % len(cycle)]
            k += 1
    return out


def _tradeoff(ax, data, xkey, ykey, maximize_x, colors, xlabel, ylabel):
    """Scatter of the variants on (xkey, ykey; lower y is better), this panel's own Pareto front
    drawn as a staircase and its points edged in black."""
    rows = [r for r in data["variants"] if r[xkey] is not None and _get(r, ykey) is not None]
    on_front = set(pareto_front([(r[xkey], _get(r, ykey)) for r in rows], maximize=(maximize_x, False)))
    labels = []
    for i, r in enumerate(rows):
        x, y = r[xkey], _get(r, ykey)
        marker = "s" if r["is_reference"] else ("*" if r["best_at_size"] else "o")
        ax.scatter([x], [y], s=130 if marker == "*" else 55, marker=marker, color=colors[r["name"]], zorder=3,
                   edgecolors="black" if i in on_front else "none", linewidths=1.2)
        labels.append(ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7.5))
    front = sorted((r for i, r in enumerate(rows) if i in on_front), key=lambda r: r[xkey])
    if len(front) >= 2:
        ax.plot([r[xkey] for r in front], [_get(r, ykey) for r in front], color="crimson", lw=1.2, ls="--",
                drawstyle="steps-pre" if maximize_x else "steps-post", zorder=2,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _declutter(ax, labels)


def _declutter(ax, labels) -> None:
    """Move point labels down, top to bottom, until no two overlap (variants of one size crowd)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for t in sorted(labels, key=lambda t: -t.xy[1]):
        for _ in range(30):
            box = t.get_window_extent(renderer).expanded(1.0, 1.1)
            if not any(box.overlaps(b) for b in placed):
                break
            dx, dy = t.xyann
            t.xyann = (dx, dy - 0.75 * box.height * 72 / fig.dpi)
        placed.append(t.get_window_extent(renderer))


def _get(r: dict, key: str):
    if key.startswith("ppl:"):
        return r["ppl"].get(key[4:])
    return r[key]


def accuracy_vs_size(data: dict, path: Path) -> Path | None:
    if not any(r["size_mb"] is not None for r in data["variants"]):
        return None
    plt = _plt()
    colors = _colors(data)
    panels = [(f"ppl:{data['datasets'][0]}", f"perplexity, {short(data['datasets'][0])} (lower is better)")] \
        if data["datasets"] else []
    panels.append(("kl", "KL to the reference, nats/token (lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        _tradeoff(ax, data, "size_mb", key, False, colors, "checkpoint size, MB", label)
    fig.suptitle("Accuracy vs size (black edge: on the Pareto front; ★ best at its size; ■ reference)", fontsize=10)
    return _save(fig, plt, path)


def accuracy_vs_speed(data: dict, path: Path) -> Path | None:
    if not data["has_speed"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    _tradeoff(ax, data, "decode_tokens_per_s", "kl", True, _colors(data), "decode tokens/s (higher is better)",
              "KL to the reference (lower is better)")
    b = data.get("bench") or {}
    ax.set_title(f"Accuracy vs decode speed ({b.get('device', '?')}, batch {b.get('batch', '?')})", fontsize=10)
    return _save(fig, plt, path)


def accuracy_vs_expert_flops(data: dict, path: Path) -> Path | None:
    """KL and perplexity against the routed experts' compute, one curve per method (each skipping rule,
    and e.g. quantized variants as points at 100%): what skipping costs in accuracy."""
    if not data.get("has_skipping"):
        return None
    plt = _plt()
    rows = [r for r in data["variants"] if r["expert_flops"] is not None]
    panels = [("kl", "KL to the reference (lower is better)")]
    if data["datasets"]:
        panels.append((f"ppl:{data['datasets'][0]}", f"perplexity, {short(data['datasets'][0])}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    ref = next((r for r in rows if r["is_reference"]), None)
    for ax, (key, label) in zip(axes[0], panels):
        by_method: dict[str, list[dict]] = {}
        for r in rows:
            if not r["is_reference"] and _get(r, key) is not None:
                by_method.setdefault(r["method"] or "?", []).append(r)
        for method, rs in by_method.items():
            pts = ([ref] if ref is not None and _get(ref, key) is not None else []) + rs
            pts.sort(key=lambda r: -r["expert_flops"])
            ax.plot([100 * r["expert_flops"] for r in pts], [_get(r, key) for r in pts], marker="o", label=method)
            for r in rs:
                ax.annotate(r["name"], (100 * r["expert_flops"], _get(r, key)), textcoords="offset points",
                            xytext=(5, 3), fontsize=7)
        if ref is not None and _get(ref, key) is not None:
            ax.scatter([100 * ref["expert_flops"]], [_get(ref, key)], marker="s", color="black", zorder=3,
                       label="reference")
        ax.set_xlabel("routed-expert FLOPs, % of the reference")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy vs expert compute (zero experts: skipped slots cost nothing)", fontsize=10)
    return _save(fig, plt, path)


def routing_per_layer(data: dict, evals: dict[str, dict], path: Path) -> Path | None:
    series = {n: (ev.get("routing") or {}).get("per_layer") or [] for n, ev in evals.items() if n != "reference"}
    series = {n: s for n, s in series.items() if s}
    if not series:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    colors = _colors(data)
    metrics = [("topk_exact", "top-k set exact match (higher is better)"), ("jaccard", "Jaccard of top-k sets"),
               ("router_kl", "router probability KL (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, metrics):
        for name, per in series.items():
            pts = [(p["layer"], p.get(key)) for p in per if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.3, color=colors.get(name), label=name)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7.5, loc="best")
    fig.suptitle("Routing agreement with the reference, per layer", fontsize=10)
    return _save(fig, plt, path)


def heatmap_variant(data: dict) -> str | None:
    """The variant whose expert load is shown: the smallest one on the Pareto front (the most
    compressed variant still worth using), else the smallest."""
    rows = [r for r in data["variants"] if not r["is_reference"] and r["size_bytes"] is not None]
    if not rows:
        return None
    front = [r for r in rows if r["pareto_size"]] or rows
    return min(front, key=lambda r: r["size_bytes"])["name"]


def expert_load(data: dict, evals: dict[str, dict], path: Path) -> Path | None:
    name = heatmap_variant(data)
    load = (evals.get(name) or {}).get("expert_load") if name else None
    if not load or not load.get("model") or not load.get("reference"):
        return None
    import numpy as np

    plt = _plt()
    ref, mod = np.asarray(load["reference"], float), np.asarray(load["model"], float)
    layers = load.get("layers") or list(range(ref.shape[0]))
    vmax = float(max(ref.max(), mod.max()))
    diff = mod - ref
    dmax = float(np.abs(diff).max()) or 1e-9
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.9 + 0.42 * len(layers) + 1.6))
    for ax, m, title, kw in ((axes[0], ref, "reference", dict(cmap="viridis", vmin=0, vmax=vmax)),
                             (axes[1], mod, name, dict(cmap="viridis", vmin=0, vmax=vmax)),
                             (axes[2], diff, f"{name} − reference", dict(cmap="RdBu_r", vmin=-dmax, vmax=dmax))):
        im = ax.imshow(m, aspect="auto", interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle("Expert load: share of the top-k assignments each expert receives", fontsize=10)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def make_plots(data: dict, evals: dict[str, dict], plot_dir: Path) -> dict[str, Path]:
    """Write every applicable figure; returns title -> PNG path."""
    todo = [("Accuracy vs size", lambda p: accuracy_vs_size(data, p), "accuracy_vs_size.png"),
            ("Accuracy vs speed", lambda p: accuracy_vs_speed(data, p), "accuracy_vs_speed.png"),
            ("Accuracy vs expert FLOPs", lambda p: accuracy_vs_expert_flops(data, p), "accuracy_vs_expert_flops.png"),
            ("Routing agreement per layer", lambda p: routing_per_layer(data, evals, p), "routing_per_layer.png"),
            ("Expert load", lambda p: expert_load(data, evals, p), "expert_load.png")]
    out = {}
    for title, fn, fname in todo:
        p = fn(plot_dir / fname)
        if p is not None:
            out[title] = p
    return out
