"""Held-out evaluation windows and the tokenizer checks that make two models comparable.

Windows come from :func:`moecompress.calib.data.make_calibration_windows` (same deterministic
sampling as calibration), tokenized with the *reference's* tokenizer. The default data are the
built-in held-out sets, disjoint from the default calibration text ``builtin:stdlib``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moecompress.arch.handle import ModelHandle
from moecompress.calib.chat import chat_renderer
from moecompress.calib.data import load_texts, make_calibration_windows, split_column
from moecompress.errors import UserError

DEFAULT_DATA = ("builtin:heldout-code", "builtin:heldout-prose")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def load_tokenizer(path, required: bool):
    """The checkpoint's tokenizer; None when it has none and ``required`` is false."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        if required:
            raise UserError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}...): "
                            "the evaluation windows are tokenized with the reference's tokenizer")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise UserError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0]}") from None


def check_vocab(model_h: ModelHandle, ref_h: ModelHandle, model_tok, ref_tok) -> None:
    """Refuse a model and reference that do not share a vocabulary (config size, tokenizer vocab)."""
    mv, rv = int(model_h.text_config.vocab_size), int(ref_h.text_config.vocab_size)
    if mv != rv:
        raise UserError(f"vocabulary mismatch: model vocab_size {mv} vs reference {rv}; "
                        "KL and agreement need the same vocabulary")
    if model_tok is not None and model_tok.get_vocab() != ref_tok.get_vocab():
        raise UserError(f"tokenizer mismatch: {model_h.reader.path} and {ref_h.reader.path} have different "
                        "vocabularies; the model must use the reference's tokenizer")


def dataset_name(spec: str) -> str:
    """A short name for a data spec: the builtin's, else the file's stem or the folder's name, with a chosen
    column (``PATH#COLUMN``) appended as ``-COLUMN``."""
    if spec.startswith("builtin:"):
        return spec[len("builtin:"):]
    spec, column = split_column(spec)
    p = Path(spec.rstrip("/"))
    return (p.stem if p.suffix else p.name) + (f"-{column}" if column else "")


def build_windows(specs: list[str], tokenizer, samples: int, seq_len: int, seed: int, vocab_size: int):
    """``({name: CalibWindows}, {name: data info})`` for every data spec, in order."""
    windows, info = {}, {}
    for spec in specs:
        name = base = dataset_name(spec) or "data"
        n = 2
        while name in windows:
            name, n = f"{base}-{n}", n + 1
        texts = load_texts(spec, chat=chat_renderer(tokenizer), what="evaluation text")
        w = make_calibration_windows(texts, tokenizer, samples, seq_len, seed, what="evaluation text")
        top = int(w.input_ids.max())
        if top >= vocab_size:
            raise UserError(f"vocabulary mismatch: the reference tokenizer produced id {top} but the model's "
                            f"vocab_size is {vocab_size}")
        windows[name] = w
        info[name] = {"spec": spec, "windows": int(w.input_ids.shape[0]), "seq_len": int(w.input_ids.shape[1]),
                      "text_sha256": texts.text_hash, "token_count": w.metadata["token_count"],
                      "windows_overlap": w.metadata["windows_overlap"]}
    return windows, info


def windows_digest(windows: dict) -> dict[str, str]:
    return {name: w.metadata["input_ids_sha256"] for name, w in windows.items()}


def as_batches(windows: dict, batch_size: int) -> list[tuple[str, torch.Tensor]]:
    """``[(dataset name, input_ids [<=B, T])]``: each dataset's windows cut into batches, in order."""
    return [(name, w.input_ids[b:b + batch_size]) for name, w in windows.items()
            for b in range(0, w.input_ids.shape[0], batch_size)]
