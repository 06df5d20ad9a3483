"""How ``moecompress run`` knows a step is up to date: what the step read, fingerprinted without reading it
(a folder's files by name, size and time, like make), and the settings it ran with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def folder_stamp(path: Path) -> str:
    """Changes whenever a file of the folder is added, removed, resized or rewritten."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# what each ``*_stamp`` of a step's stamp fingerprints, as a reason to redo the step names it
STAMPED = {"model": "model checkpoint", "reference": "reference checkpoint", "text": "evaluation text"}


def stamp_changed(stamp_file: Path, now: str, missing: bool = False) -> bool:
    """Whether what a step read changed since it wrote ``stamp_file`` (no file: ``missing``)."""
    return stamp_file.read_text().strip() != now if stamp_file.is_file() else missing


def plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def settings_diff(saved: dict, wanted: dict, defaults: dict | None = None) -> list[str]:
    """``key: old -> new`` for each setting that differs. A key the saved settings lack (a field
    added since) counts as unchanged when the wanted value is its default."""
    defaults = defaults or {}
    out = []
    for k, v in wanted.items():
        if k not in saved:
            if k in defaults and plain(defaults[k]) == v:
                continue
            out.append(f"{k}: (unset) -> {v}")
        elif saved[k] != v:
            out.append(f"{k}: {saved[k]} -> {v}")
    return out


def same_place(saved: str | None, place: str) -> bool:
    """Whether a stamp's recorded path is ``place`` (``Runner._place``: relative to the run folder, or absolute).
    A place in the run folder also matches an absolute path ending in it: what a stamp written before paths
    were recorded relative, or in the folder's old location, holds."""
    if saved == place:
        return True
    if saved is None or Path(place).is_absolute() or not Path(saved).is_absolute():
        return False
    parts = Path(place).parts
    return Path(saved).parts[-len(parts):] == parts
