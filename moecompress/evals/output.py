"""Writing an evaluation: strict JSON, atomically, and a few lines for the terminal."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from moecompress.errors import UserError


def refuse_inside(path, models: tuple, option: str) -> None:
    """Refuse an output ``path`` that is or lies inside a model folder of the run: it would replace or add
    files of the checkpoint (its config.json, or safetensors files the checkpoint then counts as shards)."""
    p = Path(path).resolve()
    for m in models:
        if m is not None and Path(m).is_dir() and (p == Path(m).resolve() or Path(m).resolve() in p.parents):
            raise UserError(f"{option} {path} lies inside the model folder {m}; write it elsewhere")


def check_json_path(path, models: tuple = ()) -> Path:
    """Refuse an output path we could not write (before hours of evaluation, not after), or one inside a model
    folder of the run (``models``)."""
    p = Path(path)
    refuse_inside(p, models, "--json")
    if p.is_dir():
        raise UserError(f"--json {p} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--json {p}: {parent} is not a directory")
    folder = parent
    while not folder.exists() and folder != folder.parent:  # the folder the file (or its missing parents) goes in
        folder = folder.parent
    try:  # a real write: permission bits do not tell for root, a read-only mount, a full disk
        fd, probe = tempfile.mkstemp(prefix=".moecompress-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--json {p}: cannot write in {folder} ({(e.strerror or str(e)).lower()})") from None
    return p


def write_json_atomic(path, obj: dict) -> Path:
    """Write ``obj`` as strict JSON (no NaN) to a temporary sibling and rename it over ``path``."""
    p = check_json_path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def summary(r: dict) -> str:
    """A short human summary of an evaluation dict."""
    lines = [f"{r['model']} vs {r['reference']} ({r['family']}, "
             f"{sum(d['windows'] for d in r['data'].values())} windows of {r['settings']['seq_len']} tokens)"]
    for name in r["ppl"]:
        lines.append(f"  {name:<16} ppl {r['ppl'][name]:.4g} (reference {r['ppl_reference'][name]:.4g})  "
                     f"KL {r['kl_per_dataset'][name]:.4g}  top-1 {100 * r['top1_per_dataset'][name]:.2f}%")
    rt = r["routing"]
    worst = min(rt["per_layer"], key=lambda x: x["topk_exact"]) if rt["per_layer"] else None
    lines.append(f"  all data         KL {r['kl']:.4g}  top-1 {100 * r['top1_agreement']:.2f}%")
    lines.append(f"  routing          top-k exact {100 * rt['topk_exact']:.2f}%  Jaccard {rt['jaccard']:.4f}  "
                 f"router KL {rt['router_kl']:.4g}" + (f"  (worst layer {worst['layer']}: "
                                                      f"{100 * worst['topk_exact']:.2f}%)" if worst else ""))
    sk, act = r.get("skip_rate"), r.get("active_experts")
    if sk and sk.get("model_overall") is not None and act:
        lines.append(f"  zero experts     skip rate {100 * sk['model_overall']:.1f}%  active experts/token "
                     f"{act['model_overall']:.3g} (reference {act['reference_overall']:.3g})  expert FLOPs saved "
                     f"{100 * act['expert_flops_saved_overall']:.1f}%")
    size = f"  size             {r['size_bytes'] / 2**20:.1f} MiB (reference {r['reference_size_bytes'] / 2**20:.1f} MiB)"
    if r["bits_per_weight"] is not None:
        size += f", {r['bits_per_weight']:.3f} bits per quantized weight"
    lines.append(size)
    if r.get("lm_eval"):
        for task, res in (r["lm_eval"].get("results") or {}).items():
            vals = ", ".join(f"{k.split(',')[0]} {v:.4g}" for k, v in res.items()
                             if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len")
            lines.append(f"  lm-eval {task}: {vals}")
    lines.append(f"  ({r['seconds']:.1f}s)")
    return "\n".join(lines)


def numeric_fields(r, prefix: str = "", skip=("seconds", "reference_cache")) -> dict[str, float]:
    """Every number of an eval result by its path (``.ppl.builtin:heldout-code``), except timings and
    the reference cache's own report: what two runs of the same evaluation must agree on."""
    if isinstance(r, dict):
        return {k: v for key, val in r.items() if key not in skip
                for k, v in numeric_fields(val, f"{prefix}.{key}", skip).items()}
    if isinstance(r, list):
        return {k: v for i, val in enumerate(r) for k, v in numeric_fields(val, f"{prefix}[{i}]", skip).items()}
    return {prefix: r} if isinstance(r, (int, float)) and not isinstance(r, bool) else {}
