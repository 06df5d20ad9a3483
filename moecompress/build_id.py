"""Which build of moecompress is running: its version and a hash of its Python sources.

A resumable run (``quantize --resume``, ``zeda --resume``) promises the bytes of an uninterrupted run,
and that holds only when the same code writes both halves: a partial run records the build that
started it, and another build refuses to continue it (:func:`check_same_build`). The hash covers every
``.py`` file of the package (paths and contents; a few ms once per process), so an edited checkout or
a new release counts as another build even where the version string did not move.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from . import __version__
from .errors import UserError


@functools.lru_cache(maxsize=None)
def code_hash() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_id() -> dict:
    return {"version": __version__, "code": code_hash()}


def _describe(b: object) -> str:
    if not isinstance(b, dict):
        return "an older build that did not record itself"
    return f"moecompress {b.get('version')}, code {b.get('code')}"


def check_same_build(saved: object, what: Path) -> None:
    """UserError (one line) unless ``saved`` (a partial run's recorded :func:`build_id`) is this build."""
    if saved != build_id():
        raise UserError(f"cannot resume {what}: it was started by {_describe(saved)}, and this is "
                        f"{_describe(build_id())}; the part it finished would not match what this build writes "
                        "(pass --overwrite to start over)")
