"""Atomic, sharded checkpoint output.

``atomic_output_dir`` builds the output in a hidden sibling folder and renames it into place only
when everything was written, so a crash or a Ctrl-C never leaves a folder that looks complete.
``ShardedWriter`` streams tensors into ``model-0000i-of-0000n.safetensors`` shards of bounded size
and writes the index that transformers and vLLM read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from .safetensors_stream import StreamingSafetensors


MAX_OUT_NAME = 240  # the hidden siblings written beside an output (".<name>.finished.tmp") must fit NAME_MAX too


# what file browsers leave in any folder: alone, they do not make a folder someone's (dot-files do: a home folder)
_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}


def check_output_path(src: Path | None, out: Path, overwrite: bool, option: str = "--out",
                      inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output folder (given as ``option``; "" for a positional argument) that cannot be written, or
    whose replacing would destroy the source (``src``; None: no source), another input of the run (``inputs``:
    calibration data...) or the current directory."""
    out = Path(out).resolve()
    if src is not None:
        refuse_overlap(src, out)
    what = f"{option} {out}" if option else str(out)
    if len(out.name.encode()) > MAX_OUT_NAME:
        raise UserError(f"{option or 'the output'} folder name is {len(out.name.encode())} bytes long; at most "
                        f"{MAX_OUT_NAME} (hidden files are written beside it)")
    for p in inputs:
        p = Path(p).resolve()
        if out == p or out in p.parents:
            raise UserError(f"{what} holds {p}, an input of this run; choose another folder")
    if out.exists() and not overwrite:
        raise UserError(f"{what} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} exists and is not a directory")
    if out.exists() and (out == Path.cwd().resolve() or out in Path.cwd().resolve().parents):
        raise UserError(f"{what} is (or contains) the current directory; --overwrite would delete it")
    if out.exists() and not (out / "config.json").is_file() and any(p.name not in _LITTER for p in out.iterdir()):
        # --overwrite replaces a model folder; a folder of other files (a typo'd path, a home folder) it would delete
        raise UserError(f"{what} holds files but no config.json: it is not a model folder, and --overwrite would "
                        "delete it; choose another folder, or remove it yourself")
    missing_parents(out)  # refuse up front a folder that cannot be created


def refuse_overlap(src: Path, out: Path, option: str = "--out") -> None:
    """UserError when the output folder ``out`` is, lies inside or contains the source model folder."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src or src in out.parents:
        raise UserError(f"{option} {out} lies inside the source model directory {src}; choose a folder outside it")
    if out in src.parents:
        raise UserError(f"{option} {out} contains the source model directory {src}; choose another folder")


def missing_parents(out: Path) -> list[Path]:
    """The ancestors of ``out`` that do not exist yet, outermost first; UserError if one cannot be made."""
    missing = []
    p = Path(out).resolve().parent
    while not p.exists():
        if p.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserError(f"cannot create the folder of --out {out}: {p} is a broken symbolic link")
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise UserError(f"cannot create the folder of --out {out}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"cannot create --out {out}: no write permission in {p}")
    return missing[::-1]


def _make_parents(missing: list[Path]) -> list[Path]:
    made = []
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        except OSError as e:
            _remove_empty(made)
            raise UserError(f"cannot create folder {p}: {e.strerror}") from None
        made.append(p)
    return made


def _remove_empty(made: list[Path]) -> None:
    for p in reversed(made):
        try:
            p.rmdir()  # only if still empty: never remove what someone else put there
        except OSError:
            break


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    Missing parent folders are created here and removed again (when still empty) if the work fails.
    """
    out = Path(out).resolve()
    made = _make_parents(missing_parents(out))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is a normal folder (servers read it)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    old = None
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"--out {out} appeared while we were writing; not replacing it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardedWriter:
    """Stream tensors into safetensors shards of at most ``max_shard_bytes``, holding none in memory.

    Each tensor goes to disk when it is added (:mod:`.safetensors_stream`), so peak memory does not
    grow with the shard size; a shard is closed before the tensor that would overflow it.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 4 << 30, resume: dict | None = None):
        """``resume``: a :meth:`commit` state of an earlier (killed) writer on the same folder; what that
        writer wrote after the state is dropped and writing goes on from there."""
        self.folder = Path(folder)
        self.max_bytes = max_shard_bytes
        self._current: StreamingSafetensors | None = None
        self._shards: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0
        self._resumable = resume is not None
        self._finished_spills: list[Path] = []  # spills of shards finished since the last commit
        if resume is not None:
            self._restore(resume)

    def _shard_path(self, i: int) -> Path:
        return self.folder / f".shard-{i:05d}.safetensors"

    def _restore(self, state: dict) -> None:
        self._resumable = True
        self._shards = [list(names) for names in state["shards"]]
        self.total_bytes = int(state["total_bytes"])
        self._seen = {n for names in self._shards for n in names}
        n = len(self._shards)
        for i in range(n):  # finished before the state: their spills are no longer needed
            self._unrename(i)
            self._shard_path(i).with_name(self._shard_path(i).name + ".data").unlink(missing_ok=True)
        for f in [*self.folder.glob("model*.safetensors"), self.folder / "model.safetensors.index.json"]:
            f.unlink(missing_ok=True)  # a killed close() named shards the state does not list as finished
        for f in self.folder.glob(".shard-*.safetensors*"):  # written after the state: dropped
            i = int(f.name.split("-")[1].split(".")[0])
            if i > n or (i == n and (state["current"] is None or f.suffix == ".safetensors")):
                f.unlink()
        if state["current"] is not None:
            self._current = StreamingSafetensors(self._shard_path(n), resume=state["current"])
            self._seen.update(self._current.names)

    def _unrename(self, i: int) -> None:
        """Shard ``i`` back at its working name, if a killed :meth:`close` had already given it its final one."""
        path = self._shard_path(i)
        if path.is_file():
            return
        final = sorted(self.folder.glob(f"model-{i + 1:05d}-of-*.safetensors"))
        if i == 0 and (self.folder / "model.safetensors").is_file():
            final.append(self.folder / "model.safetensors")
        if not final:
            raise RuntimeError(f"{path} is missing: the folder does not hold the shards its saved state lists")
        os.replace(final[0], path)

    def commit(self) -> dict:
        """A state to resume from (JSON-able); every byte written so far is handed to the operating system.
        Spill files of shards finished before this call are removed: call it when the state is saved."""
        state = {"shards": [list(s) for s in self._shards], "total_bytes": self.total_bytes,
                 "current": None if self._current is None else self._current.state()}
        self._resumable = True
        return state

    def drop_finished_spills(self) -> None:
        """Remove the spill files of shards that a saved :meth:`commit` state lists as finished."""
        for p in self._finished_spills:
            p.unlink(missing_ok=True)
        self._finished_spills.clear()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise RuntimeError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._current is not None and len(self._current) and self._current.nbytes + nbytes > self.max_bytes:
            self.flush()
        if self._current is None:
            self._current = StreamingSafetensors(self._shard_path(len(self._shards)))
        self.total_bytes += self._current.add(name, tensor)
        self._seen.add(name)

    def flush(self) -> None:
        """Close the current shard (the next tensor starts a new one)."""
        if self._current is None:
            return
        if len(self._current):
            # a resumable writer keeps the spill until a saved state lists the shard as finished
            self._current.finish({"format": "pt"}, keep_spill=self._resumable)
            if self._resumable:
                self._finished_spills.append(self._current._spill_path)
            self._shards.append(sorted(self._current.names))
        else:
            self._current.discard()
        self._current = None

    def abort(self) -> None:
        """Drop the shard being written (its spill file); finished shards are the caller's folder's to remove."""
        if self._current is not None:
            self._current.discard()
            self._current = None

    def close(self) -> list[str]:
        """Name the shards, write the index (when more than one), and return the shard file names.

        A resumable writer keeps the spill files (hidden ``.shard-*.data``) of the shards finished since the
        last :meth:`commit`: that saved state still needs them if the process dies before the output is in
        place. Whoever moves the output into place removes them after the state (``checkpoint.partial``)."""
        self.flush()
        if not self._resumable:
            self.drop_finished_spills()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(self.folder / f".shard-{i:05d}.safetensors", self.folder / final)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "moecompress.json",
              "quantize_config.json"}


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config, chat template... (every top-level non-weight file)."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied
