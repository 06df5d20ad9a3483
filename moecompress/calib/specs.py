"""What a data spec names on disk, and the model folder's tokenizer: for the commands that read text.

``spec_paths`` lists the files and folders a spec reads (an output folder must not hold them),
``specs_stamp`` fingerprints them without reading them (``moecompress run`` redoes a step that read text
edited since), ``load_tokenizer`` loads a model folder's tokenizer or says in one line why it cannot.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

from ..errors import UserError
from .data import _folder_files, split_column


def spec_paths(*specs: str | None) -> tuple[Path, ...]:
    """The files or folders that data specs read (``PATH#COLUMN`` and ``~`` resolved; builtins and paths that do
    not exist left out): what an output folder must not hold, since replacing it would delete them."""
    out = []
    for spec in specs:
        if isinstance(spec, str) and spec.strip() and not spec.startswith("builtin:"):
            path = Path(os.path.expanduser(split_column(spec)[0]))
            if path.exists():
                out.append(path)
    return tuple(out)


def specs_stamp(*specs: str | None) -> str:
    """A cheap fingerprint of the text behind data specs (no file is read): it changes when a named file, or a
    file of a named folder, is added, removed, resized or rewritten, and for ``builtin:`` text (the Python
    standard library's own files) with the Python version. What ``moecompress run`` compares to know that a
    build or evaluation read other text."""
    import platform

    h = hashlib.sha256()
    for spec in specs:
        if not isinstance(spec, str):
            continue
        h.update(f"{spec}\0".encode())
        if spec.startswith("builtin:"):  # the standard library's own files (a venv shares its base's)
            h.update(f"python {platform.python_version()} {sysconfig.get_paths()['stdlib']}\n".encode())
            continue
        path = Path(os.path.expanduser(split_column(spec)[0]))
        files = _folder_files(path) if path.is_dir() else [path]  # what the loader reads: no hidden files
        for f in files:
            try:
                st = f.stat()
                h.update(f"{f.relative_to(path) if f != path else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def load_tokenizer(model_dir: str | Path, needed_for: str = "calibration"):
    """The model folder's tokenizer (never remote code); one-line UserError when it has none or it fails to load."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...): {needed_for} "
                        "needs the tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer of {model_dir} (needed for {needed_for}): "
                        f"{str(e).splitlines()[0]}") from None
