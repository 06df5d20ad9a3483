"""Calibration text sources and deterministic token windows.

``load_texts(spec)`` accepts:

* a text file (any extension not listed below): one document, the whole file (UTF-8; NUL bytes
  or invalid UTF-8 are an error);
* a folder of text files: recursive, sorted by relative path, one document per file; hidden files
  and folders are skipped, binary files (NUL bytes / invalid UTF-8) and empty files are skipped.
  A folder holding only ``.jsonl/.json`` or only ``.parquet`` or only ``.arrow`` files is loaded
  as one dataset from all of them; mixing those with text files is an error;
* a ``.jsonl``/``.json``, ``.parquet`` or ``.arrow`` file, through ``datasets.load_dataset``
  (split ``train``);
* a ``datasets.save_to_disk`` folder (it holds ``state.json`` or ``dataset_dict.json``), through
  ``datasets.load_from_disk``; of a ``DatasetDict`` the ``train`` split, else the first split;
* ``builtin:<name>``: Python standard library text, see :mod:`moecompress.calib.builtin_text`
  (``builtin:stdlib`` is the calibration part, ``builtin:heldout*`` the disjoint held-out part).

Text column of a dataset: ``text_column`` if given (``PATH#COLUMN`` in a spec), else ``text``, else a column of conversations
(``messages``..., rendered one document each: :mod:`moecompress.calib.chat`), else the only string column;
anything else is an error naming the columns. Rows that are null or blank are dropped
(blank documents are dropped by every source).

``TextSource.text_hash`` is the sha256 of the sorted per-document sha256 digests: it changes when
any document's text changes and does not depend on document order or file names.

``make_calibration_windows`` samples ``n_samples`` windows of ``seq_len`` tokens:

1. documents are put in a canonical order (by digest, so the result depends only on the text, not
   on how it was listed) and cut into units of ``CHUNK_CHARS`` characters (cut just after a
   newline when one lies within ``SNAP_CHARS`` of the boundary);
2. the units are shuffled with ``random.Random(seed)`` and tokenized in that order
   (no special tokens), joined by the tokenizer's EOS token (else the tokens of ``"\\n\\n"``),
   until the stream holds ``TOKEN_BUDGET_FACTOR * n_samples * seq_len`` tokens or the text ends:
   a large corpus is never fully tokenized;
3. the stream is cut into ``len // seq_len`` non-overlapping slots at a random offset and
   ``n_samples`` distinct slots are drawn (same generator); when there are fewer slots than
   samples, all slots are used and the rest start at random positions (windows overlap).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .builtin_text import BUILTINS, load_builtin
from .chat import Renderer, chat_column, render_column

log = logging.getLogger("moecompress")

CHUNK_CHARS = 1 << 16
SNAP_CHARS = 4096
TOKEN_BUDGET_FACTOR = 4
_TOKENIZE_BATCH = 16
_SNIFF_BYTES = 8192

DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
UNSUPPORTED_EXTENSIONS = frozenset(
    ".csv .tsv .gz .bz2 .xz .zst .zip .tar .tgz .7z .pdf .docx .xlsx .pt .pth .bin .safetensors "
    ".npy .npz .pkl .pickle .h5 .hdf5 .feather .orc .avro .png .jpg .jpeg .gif .so .pyc .exe".split()
)
_SUPPORTED = "a text file, a folder, .jsonl/.json/.parquet/.arrow, a save_to_disk folder or builtin:stdlib"


class _ColumnView(Sequence):
    """Lazy read-only view of the non-blank rows of one string column of a ``datasets.Dataset``."""

    def __init__(self, dataset: Any, column: str, rows: list[int] | None):
        self._ds = dataset.select_columns([column])
        self._col = column
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._ds)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._ds[self._rows[i] if self._rows is not None else i][self._col]


@dataclass(frozen=True)
class TextSource:
    """Documents to calibrate on, where they came from, and a hash of their exact text."""

    description: str
    documents: Sequence[str] = field(repr=False, compare=False)  # a list, or a lazy view over a dataset column
    text_hash: str  # sha256 hex of the sorted per-document sha256 digests
    n_documents: int
    n_chars: int
    doc_digests: tuple[bytes, ...] = field(repr=False, compare=False)
    doc_lengths: tuple[int, ...] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return self.n_documents

    def __iter__(self) -> Iterator[str]:
        return iter(self.documents)


@dataclass(frozen=True)
class CalibWindows:
    """``input_ids`` LongTensor ``[n_samples, seq_len]`` and JSON-serializable provenance."""

    input_ids: torch.Tensor
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------------------- sources


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _make_source(description: str, documents: Sequence[str], origin: str, digests=None, lengths=None) -> TextSource:
    if digests is None:
        documents = [d for d in documents if d.strip()]
        digests = [_digest(d) for d in documents]
        lengths = [len(d) for d in documents]
    if not documents:
        raise UserError(f"{origin} contains no text")
    text_hash = hashlib.sha256(b"".join(sorted(digests))).hexdigest()
    n_chars = sum(lengths)
    return TextSource(
        description=f"{description}: {len(documents)} documents, {n_chars} characters",
        documents=documents,
        text_hash=text_hash,
        n_documents=len(documents),
        n_chars=n_chars,
        doc_digests=tuple(digests),
        doc_lengths=tuple(lengths),
    )


def _decode(data: bytes) -> str | None:
    """The UTF-8 text of ``data`` (BOM stripped), or None if it looks binary."""
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text[1:] if text.startswith("\ufeff") else text


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _load_text_file(path: Path) -> TextSource:
    text = _decode(path.read_bytes())
    if text is None:
        raise UserError(f"{path} is not a UTF-8 text file (NUL bytes or invalid UTF-8); pass {_SUPPORTED}")
    return _make_source(f"text file {path}", [text], f"text file {path}")


def _load_folder(folder: Path, text_column: str | None = None, chat: Renderer | None = None) -> TextSource:
    files = [f for f in _folder_files(folder) if f.is_file()]
    data_files = [f for f in files if f.suffix.lower() in DATASET_BUILDERS]
    if data_files:
        builders = {DATASET_BUILDERS[f.suffix.lower()] for f in data_files}
        others = [f for f in files if f.suffix.lower() not in DATASET_BUILDERS]
        if len(builders) > 1 or others:
            example = (others or data_files)[0].relative_to(folder)
            raise UserError(
                f"folder {folder} mixes dataset files ({', '.join(sorted(builders))}) with other files "
                f"(e.g. {example}); pass one data file or a folder of one kind"
            )
        return _load_dataset_files(builders.pop(), data_files, f"folder {folder}", text_column, chat)
    _no_columns(folder, text_column)
    docs, skipped = [], 0
    for f in files:
        text = _decode(f.read_bytes())
        if text is None:
            skipped += 1
        elif text.strip():
            docs.append(text)
    if not docs:
        raise UserError(f"folder {folder} contains no non-empty UTF-8 text files ({len(files)} files, {skipped} binary)")
    desc = f"folder {folder}" + (f" (skipped {skipped} binary files)" if skipped else "")
    return _make_source(desc, docs, f"folder {folder}")


def _one_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # datasets wraps the parser's error ("An error occurred while generating...")
        e = e.__cause__
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _pick_column(ds: Any, origin: str, text_column: str | None) -> str:
    from datasets import Value

    def is_str(name: str) -> bool:
        feat = ds.features[name]
        return isinstance(feat, Value) and feat.dtype in ("string", "large_string")

    described = ", ".join(f"{n} ({getattr(f, 'dtype', type(f).__name__)})" for n, f in ds.features.items())
    if text_column is not None:
        if text_column not in ds.features or not is_str(text_column):
            raise UserError(f"{origin} has no string column '{text_column}'; columns: {described or 'none'}")
        return text_column
    if "text" in ds.features:
        if is_str("text"):
            return "text"
        raise UserError(f"{origin}: column 'text' is not a string column; columns: {described}")
    strings = [n for n in ds.features if is_str(n)]
    if len(strings) == 1:
        return strings[0]
    why = "no string column" if not strings else "several string columns and none is named 'text'"
    example = f"PATH#{strings[0]}" if strings else "PATH#COLUMN"
    raise UserError(f"{origin} has {why}; columns: {described or 'none'}; name one after the path: {example}")


def _source_from_dataset(ds: Any, origin: str, text_column: str | None, chat: Renderer | None = None) -> TextSource:
    try:
        return _read_dataset(ds, origin, text_column, chat)
    except UnicodeDecodeError as e:  # a JSON file in another encoding: datasets decodes its strings only now
        raise UserError(f"{origin} holds text that is not UTF-8 ({e.reason} at byte {e.start} of a value); "
                        "re-encode it as UTF-8") from None


def _read_dataset(ds: Any, origin: str, text_column: str | None, chat: Renderer | None) -> TextSource:
    if len(ds) == 0:
        raise UserError(f"{origin} is empty (0 rows)")
    if text_column is None:
        conversations = chat_column(ds) if "text" not in ds.features else None
    else:  # a named column of conversations is rendered too
        conversations = chat_column(ds, (text_column,)) if text_column in ds.features else None
    if conversations is not None:  # one document per conversation (calib.chat)
        return _make_source(f"{origin} column '{conversations}' (conversations)",
                            render_column(ds, conversations, origin, chat), origin)
    column = _pick_column(ds, origin, text_column)
    rows, digests, lengths = [], [], []
    i = 0
    for batch in ds.select_columns([column]).iter(batch_size=1024):
        for text in batch[column]:
            if text is not None and text.strip():
                rows.append(i)
                digests.append(_digest(text))
                lengths.append(len(text))
            i += 1
    view = _ColumnView(ds, column, None if len(rows) == i else rows)
    return _make_source(f"{origin} column '{column}'", view, origin, digests, lengths)


@contextlib.contextmanager
def _quiet_datasets():
    """Silence ``datasets``' progress bars ("Generating train split") and logging; restore them after.

    Reading a calibration file is one step of a command that has its own progress output; a bar
    printed just before an error line would bury the error.
    """
    from datasets.utils import logging as ds_logging

    bars, level = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    with warnings.catch_warnings():  # it warns (and keeps the bars) when HF_DATASETS_DISABLE_PROGRESS_BARS=0
        warnings.simplefilter("ignore")
        ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # a parse failure is logged as an error, then raised
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            ds_logging.enable_progress_bar()


def _load_dataset_files(builder: str, files: list[Path], origin: str, text_column: str | None = None,
                        chat: Renderer | None = None) -> TextSource:
    from datasets import load_dataset

    if all(f.stat().st_size == 0 for f in files):
        raise UserError(f"{origin} is empty (0 bytes)")
    with _quiet_datasets():
        try:
            ds = load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # noqa: BLE001 - malformed user data surfaces as many exception types
            if "corresponds to no data" in str(e):  # datasets' way of saying "0 rows"
                raise UserError(f"{origin} is empty (0 rows)") from e
            raise UserError(f"could not read {origin} as {builder}: {_one_line(e)}") from e
        return _source_from_dataset(ds, origin, text_column, chat)


def _load_saved_dataset(folder: Path, text_column: str | None, chat: Renderer | None = None) -> TextSource:
    from datasets import DatasetDict, load_from_disk

    origin = f"saved dataset {folder}"
    try:  # load_from_disk fails on a split of 0 shards ("list index out of range")
        if json.loads((folder / "state.json").read_text()).get("_data_files") == []:
            raise UserError(f"{origin} is empty (0 rows)")
    except (OSError, ValueError, AttributeError):
        pass  # no or odd state.json: a DatasetDict folder, or let load_from_disk judge
    try:
        for split in json.loads((folder / "dataset_dict.json").read_text()).get("splits", []):
            if json.loads((folder / split / "state.json").read_text()).get("_data_files") == []:
                raise UserError(f"{origin}: split '{split}' is empty (0 rows); save it without that split")
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    with _quiet_datasets():
        try:
            ds = load_from_disk(str(folder))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"could not load the save_to_disk folder {folder}: {_one_line(e)}") from e
        if isinstance(ds, DatasetDict):
            if not ds:
                raise UserError(f"{origin} contains no splits")
            split = "train" if "train" in ds else next(iter(ds))
            ds, origin = ds[split], f"{origin} split '{split}'"
        return _source_from_dataset(ds, origin, text_column, chat)


def split_column(spec: str) -> tuple[str, str | None]:
    """``(path, column)`` of a ``PATH#COLUMN`` data spec; ``(spec, None)`` when it names no column (or when a
    file of that very name, ``#`` and all, exists)."""
    if "#" in spec and not spec.startswith("builtin:") and not Path(os.path.expanduser(spec)).exists():
        base, _, column = spec.rpartition("#")
        if column and Path(os.path.expanduser(base)).exists():
            return base, column
    return spec, None


def load_texts(spec: str, *, text_column: str | None = None, chat: Renderer | None = None,
               what: str = "calibration text") -> TextSource:
    """Load calibration text from a file, folder, dataset file/folder or ``builtin:<name>``.

    ``chat``: how a dataset of conversations becomes documents (``calib.chat.chat_renderer(tokenizer)``: the
    model's chat template; None: ``role: content`` lines). ``what`` the text is, as errors name it."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty {what} spec; pass {_SUPPORTED}")
    if spec.startswith("builtin:"):
        docs, desc = load_builtin(spec[len("builtin:") :])
        return _make_source(desc, [t for _, t in docs], spec)
    path_spec, column = split_column(spec)
    if column is not None and text_column is None:  # PATH#COLUMN: which column holds the text
        spec, text_column = path_spec, column
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        hint = f"; valid builtins: {', '.join('builtin:' + n for n in BUILTINS)}" if ":" in spec else ""
        raise UserError(f"{what} path does not exist: {spec}{hint}")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _load_saved_dataset(path, text_column, chat)
        return _load_folder(path, text_column, chat)
    suffix = path.suffix.lower()
    if suffix in DATASET_BUILDERS:
        return _load_dataset_files(DATASET_BUILDERS[suffix], [path], f"{suffix[1:]} file {path}", text_column, chat)
    if suffix in UNSUPPORTED_EXTENSIONS:
        raise UserError(f"unsupported file extension '{suffix}' for {what} ({path}); pass {_SUPPORTED}")
    _no_columns(path, text_column)
    return _load_text_file(path)


def _no_columns(path: Path, text_column: str | None) -> None:
    if text_column is not None:
        raise UserError(f"{path}#{text_column}: a column (#{text_column}) can only be chosen in a dataset file or "
                        "folder")


# ----------------------------------------------------------------------------------------- windows


def _snap(doc: str, pos: int) -> int:
    nl = doc.find("\n", pos, pos + SNAP_CHARS)
    return nl + 1 if nl >= 0 else pos


def _unit_text(doc: str, j: int) -> str:
    start = 0 if j == 0 else _snap(doc, j * CHUNK_CHARS)
    end = len(doc) if (j + 1) * CHUNK_CHARS >= len(doc) else _snap(doc, (j + 1) * CHUNK_CHARS)
    return doc[start:end]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover
        Tokenizer = ()  # type: ignore[assignment]
    if isinstance(tokenizer, Tokenizer):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _separator(tokenizer: Any) -> tuple[list[int], str]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return [eos], "eos"
    return _encode(tokenizer, ["\n\n"])[0], "\\n\\n"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")
    return value


def make_calibration_windows(
    texts: TextSource, tokenizer: Any, n_samples: int, seq_len: int, seed: int, length_name: str = "seq_len",
    warn_overlap: bool = True, what: str = "calibration text",
) -> CalibWindows:
    """Sample ``n_samples`` windows of exactly ``seq_len`` tokens from ``texts``, determined by ``seed``;
    ``length_name``: how the caller's user names the window length (errors say it)."""
    _check_int("n_samples", n_samples, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("seed", seed, -(2**63))
    sep, sep_name = _separator(tokenizer)
    target = TOKEN_BUDGET_FACTOR * n_samples * seq_len

    order = sorted(range(texts.n_documents), key=lambda i: (texts.doc_digests[i], i))
    units = [(i, j) for i in order for j in range(max(1, -(-texts.doc_lengths[i] // CHUNK_CHARS)))]
    rng = random.Random(seed)
    rng.shuffle(units)

    stream: list[int] = []
    used = 0
    done = False
    for b in range(0, len(units), _TOKENIZE_BATCH):
        batch = units[b : b + _TOKENIZE_BATCH]
        for ids in _encode(tokenizer, [_unit_text(texts.documents[i], j) for i, j in batch]):
            used += 1
            if not ids:
                continue
            if stream:
                stream.extend(sep)
            stream.extend(ids)
            if len(stream) >= target:
                done = True
                break
        if done:
            break

    total = len(stream)
    if total < seq_len:
        raise UserError(
            f"{what} gives only {total} tokens, fewer than one window of {length_name}={seq_len} "
            f"({texts.description}); use more text or a shorter {length_name}"
        )
    n_slots = total // seq_len
    if n_slots >= n_samples:
        offset = rng.randrange(total - n_slots * seq_len + 1)
        starts = [offset + s * seq_len for s in rng.sample(range(n_slots), n_samples)]
    else:
        starts = [s * seq_len for s in range(n_slots)]
        starts += [rng.randrange(total - seq_len + 1) for _ in range(n_samples - n_slots)]
        if warn_overlap:  # (the demo's training steps reuse windows on purpose)
            log.warning("%s gives %d tokens: room for %d distinct windows of %d tokens, so %d of the %d windows "
                        "overlap others (the same text counted more than once); use more text or fewer samples",
                        texts.description, total, n_slots, seq_len, n_samples - n_slots, n_samples)
    ids_stream = torch.tensor(stream, dtype=torch.long)
    index = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(seq_len)
    input_ids = ids_stream[index].contiguous()

    metadata = {
        "source": texts.description,
        "text_hash": texts.text_hash,
        "n_documents": texts.n_documents,
        "n_chars": texts.n_chars,
        "token_count": total,
        "token_target": target,
        "units_tokenized": used,
        "units_total": len(units),
        "windows_overlap": n_slots < n_samples,
        "separator": sep_name,
        "separator_ids": list(sep),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "seed": seed,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "input_ids_sha256": hashlib.sha256(input_ids.numpy().astype("<i8").tobytes()).hexdigest(),
    }
    return CalibWindows(input_ids=input_ids, metadata=metadata)
