"""Built-in text every Python install has, for calibration and evaluation without downloads.

Two corpora, both read from the running interpreter (so the exact text differs between Python
versions: record ``TextSource.text_hash``):

* **code**: the standard library's own ``.py`` sources under ``sysconfig.get_paths()["stdlib"]``,
  one document per file, sorted by relative POSIX path. Excluded, so that the set is the same on
  every install of one Python version: ``site-packages``/``dist-packages`` (third-party code),
  the test suites (directories named ``test``, ``tests``, ``idle_test``; distributions often strip
  them and they hold deliberately malformed files), ``__pycache__``, hidden files and folders,
  ``config-*`` folders and ``_sysconfigdata*`` modules (build-machine specific), files that are
  not valid UTF-8 and empty files. Files with identical text are kept once, under their first
  path in sorted order (the stdlib has a few identical ``__init__.py``). Document key: the relative path, e.g. ``json/decoder.py``.
* **prose**: the pydoc help topics in ``pydoc_data.topics`` (the language reference prose that
  ``help("assert")`` prints), one document per topic, sorted by topic name.
  Document key: ``pydoc_data/topics/<topic>``, e.g. ``pydoc_data/topics/assert``.

Held-out split (deterministic, stable when files are added or removed): a document is *held out*
when ``int(sha1(key.encode("utf-8")).hexdigest(), 16) % 10 == 0``, about 10% of each corpus.

Builtin names (``builtin:<name>``):

* ``stdlib``: calibration part, code + prose (the default calibration text);
* ``stdlib-code`` / ``stdlib-prose``: the calibration part of one corpus;
* ``heldout``: held-out part, code + prose;
* ``heldout-code`` / ``heldout-prose``: the held-out part of one corpus.

The calibration and held-out parts never share a document key.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from ..errors import UserError

HELDOUT_MODULUS = 10
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
PROSE_KEY_PREFIX = "pydoc_data/topics/"

# name -> (corpora, held_out)
BUILTINS: dict[str, tuple[tuple[str, ...], bool]] = {
    "stdlib": (("code", "prose"), False),
    "stdlib-code": (("code",), False),
    "stdlib-prose": (("prose",), False),
    "heldout": (("code", "prose"), True),
    "heldout-code": (("code",), True),
    "heldout-prose": (("prose",), True),
}


def is_heldout(key: str) -> bool:
    """Whether the document with this key belongs to the held-out part (sha1(key) mod 10 == 0)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % HELDOUT_MODULUS == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel_parts: tuple[str, ...]) -> bool:
    *dirs, name = rel_parts
    if any(d in EXCLUDED_DIRS or d.startswith((".", "config-")) for d in dirs):
        return True
    return name.startswith((".", "_sysconfigdata"))


def code_documents() -> list[tuple[str, str]]:
    """All stdlib ``.py`` sources as ``(key, text)``, sorted by key (both parts of the split)."""
    root = stdlib_root()
    if not root.is_dir():
        raise UserError(f"the Python standard library folder {root} does not exist; builtin text is unavailable")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        dirnames[:] = [d for d in dirnames if not _excluded(rel_dir + (d, "x"))]
        for fn in filenames:
            if not fn.endswith(".py") or _excluded(rel_dir + (fn,)):
                continue
            try:
                text = (Path(dirpath) / fn).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip() and "\x00" not in text:
                docs.append(("/".join(rel_dir + (fn,)), text))
    return _dedupe(docs)


def prose_documents() -> list[tuple[str, str]]:
    """The pydoc help topics as ``(key, text)``, sorted by key (both parts of the split)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise UserError(f"pydoc_data.topics is not available in this Python ({e}); use builtin:stdlib-code") from e
    return _dedupe([(PROSE_KEY_PREFIX + name, text) for name, text in topics.items() if text.strip()])


def _dedupe(docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Sorted by key, identical texts kept once under their first key (so split parts share no text)."""
    seen: set[str] = set()
    out = []
    for key, text in sorted(docs):
        if text not in seen:
            seen.add(text)
            out.append((key, text))
    return out


def load_builtin(name: str) -> tuple[list[tuple[str, str]], str]:
    """The ``(key, text)`` documents of ``builtin:<name>`` and a human description."""
    if name not in BUILTINS:
        valid = ", ".join(f"builtin:{n}" for n in BUILTINS)
        raise UserError(f"unknown builtin text 'builtin:{name}'; valid names: {valid}")
    corpora, held_out = BUILTINS[name]
    docs: list[tuple[str, str]] = []
    parts = []
    for corpus in corpora:
        everything = code_documents() if corpus == "code" else prose_documents()
        chosen = [(k, t) for k, t in everything if is_heldout(k) == held_out]
        docs.extend(chosen)
        parts.append(f"{len(chosen)} {'.py files' if corpus == 'code' else 'pydoc topics'}")
    part = "held-out" if held_out else "calibration"
    version = ".".join(map(str, sys.version_info[:3]))
    return docs, f"builtin:{name} (Python {version} stdlib, {part} part: {' + '.join(parts)})"
