"""The resumable output folder of a long run (``quantize``): what a killed run leaves, and how it goes on.

A run builds its output in ``.<out>.partial`` beside ``<out>`` and renames it into place when it is
complete, so nothing that looks finished exists before the end. After each finished decoder layer the
run *commits*: the shard bytes written so far are handed to the operating system, the calibration feed
(the hidden states that enter the next layer) is saved as safetensors, and ``manifest.json`` is replaced
atomically (temporary file, then rename). A ``kill -9`` at any moment therefore leaves the last
committed layer intact, and ``--resume`` goes on from there; since every layer is a deterministic
function of its weights and its feed, the result is byte-identical to an uninterrupted run.

The manifest names the build of moecompress that started the run (:mod:`moecompress.build_id`), the
settings and a fingerprint of the source checkpoint (its config and the headers of its shards); a resume
by another build, or whose settings or source differ, is refused, naming the first difference.
Nothing here is read with pickle: the manifest is JSON, the feed safetensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch

from ..build_id import build_id, check_same_build
from ..errors import UserError
from .writer import _make_parents, _remove_empty, check_output_path, missing_parents

log = logging.getLogger("moecompress")

MANIFEST = "manifest.json"
FORMAT = 1


def source_fingerprint(model_dir: Path) -> str:
    """Changes when the source checkpoint's config or weights change: the config's bytes and each
    safetensors file's name, size, modification time and header (names, dtypes, shapes, offsets). Reads no
    tensor data: new weights of the same shapes (another seed, a fine-tune) show in the modification time;
    so does a copy that did not keep it (a conservative refusal: --overwrite starts over)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".json":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix == ".safetensors":
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(min(n, 100 << 20)))
    return h.hexdigest()[:24]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PartialRun:
    """``.<out>.partial``: shards so far, the manifest, the feed of the next layer."""

    def __init__(self, out_dir: Path, settings: dict, source: str):
        self.out = Path(out_dir).resolve()
        self.path = self.out.parent / f".{self.out.name}.partial"
        # written once the output is complete and only the rename is left: a run killed then is finished by --resume
        self.finished_marker = self.out.parent / f".{self.out.name}.finished"
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from JSON
        self.source = source
        self.layers_done = 0
        self._feed_prefix: str | None = None
        self._lock_fd: int | None = None
        self._made: list[Path] = []  # parent folders lock() created

    # ------------------------------------------------------------------------------ one writer
    def lock(self) -> None:
        """Hold ``.<out>.lock`` beside ``out`` until :meth:`unlock` (or the process ends): a second run writing the
        same ``--out`` (a scheduler's retry while the first still runs) is refused instead of corrupting it."""
        lock = self.out.parent / f".{self.out.name}.lock"
        self._made = _make_parents(missing_parents(self.out))  # removed again by unlock() if left empty
        while self._lock_fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(f"another moecompress run (pid {owner}) is writing --out {self.out}; wait for it, "
                                "or stop it first") from None
            try:  # the file may have been unlinked by the run that held it: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._lock_fd, self._lock_path = fd, lock

    def unlock(self) -> None:
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
            _remove_empty(self._made)

    # ------------------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict:
        try:
            m = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {self.path / MANIFEST} ({e}); pass --overwrite to discard the partial "
                            "run") from None
        if m.get("format") != FORMAT:
            raise UserError(f"{self.path} was written by another version of moecompress; pass --overwrite to "
                            "discard it")
        return m

    def describe(self) -> str:
        m = self.manifest()
        return f"{m['layers_done']} of {m['num_layers']} layers done"

    def check(self) -> dict:
        """The manifest, or UserError naming the first difference from this run."""
        m = self.manifest()
        check_same_build(m.get("build"), self.path)
        if m["source"] != self.source:
            raise UserError(f"cannot resume {self.path}: the source checkpoint differs from the one it was started "
                            "on (its config or weights changed); pass --overwrite to start over")
        saved = m["settings"]
        for k in sorted(set(saved) | set(self.settings)):
            if saved.get(k) != self.settings.get(k):
                raise UserError(f"cannot resume {self.path}: setting '{k}' was {saved.get(k)!r}, now "
                                f"{self.settings.get(k)!r} (pass the same settings, or --overwrite to start over)")
        return m

    def load_feed(self, manifest: dict, chunks: dict[int, list[int]], key: str = "batch") -> dict[int, torch.Tensor] | None:
        """The saved hidden states of the listed chunks' batches: ``{global batch: tensor}`` (None: no feed);
        ``key="reference"``: the float model's (``LayerFeed.reference``), saved beside them."""
        from safetensors.torch import load_file

        prefix = manifest.get("feed")
        if prefix is None:
            return None
        out = {}
        for c, batches in chunks.items():
            f = self.path / f"{prefix}-c{c:04d}.safetensors"
            if not f.is_file():
                raise ResumeError(f"cannot resume {self.path}: {f.name} is missing (pass --overwrite to start over)")
            try:
                tensors = load_file(str(f))
            except Exception as e:  # noqa: BLE001 -- a damaged file (safetensors raises its own error types)
                raise ResumeError(f"cannot resume {self.path}: {f.name} is damaged ({type(e).__name__}); pass "
                                  "--overwrite to start over") from None
            for b in batches:
                if f"{key}.{b:05d}" not in tensors:
                    raise ResumeError(f"cannot resume {self.path}: {f.name} lacks {key} {b} (pass --overwrite to "
                                      "start over)")
                out[b] = tensors[f"{key}.{b:05d}"]
        return out

    # ------------------------------------------------------------------------------ writing
    def save_feed(self, layers_done: int, chunk: int, batches: dict[int, torch.Tensor],
                  reference: dict[int, torch.Tensor] | None = None) -> None:
        """Save one chunk's hidden states after ``layers_done`` layers (each rank saves its own chunks), and
        the float model's where the run keeps them (``reference``)."""
        from safetensors.torch import save_file

        name = f"feed-{layers_done:05d}-c{chunk:04d}.safetensors"
        tmp = self.path / f".{name}.tmp"
        tensors = {f"batch.{b:05d}": h.detach().to("cpu").contiguous() for b, h in batches.items()}
        tensors.update({f"reference.{b:05d}": h.detach().to("cpu").contiguous() for b, h in (reference or {}).items()})
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path / name)

    def commit(self, layers_done: int, num_layers: int, writer_state: dict, records: list, has_feed: bool,
               extra: dict | None = None) -> None:
        """Save the state after ``layers_done`` layers, once every chunk's feed is saved: the manifest that
        points to them (atomically), then drop what the previous manifest needed."""
        prefix = f"feed-{layers_done:05d}" if has_feed else None
        manifest = {"format": FORMAT, "build": build_id(), "settings": self.settings,
                    "settings_hash": settings_hash(self.settings),
                    "source": self.source, "num_layers": num_layers, "layers_done": layers_done,
                    "writer": writer_state, "feed": prefix, "records": records, **(extra or {})}
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, default=json_default) + "\n")
        os.replace(tmp, self.path / MANIFEST)
        self.layers_done, self._feed_prefix = layers_done, prefix
        self._drop_feeds(older_only=True)  # other ranks may already be saving the next layer's

    def adopt(self, manifest: dict) -> None:
        """Continue from a checked manifest: forget feed files other than the ones it names."""
        self.layers_done, self._feed_prefix = int(manifest["layers_done"]), manifest.get("feed")
        self._drop_feeds(older_only=False)

    def _drop_feeds(self, older_only: bool) -> None:
        for f in self.path.glob("*feed-*.safetensors*"):
            done = int(f.name.lstrip(".").split("-")[1])
            if done != self.layers_done or self._feed_prefix is None:
                if not older_only or done < self.layers_done:
                    f.unlink(missing_ok=True)

    def discard(self) -> None:
        remove_partial(self.path)
        self.layers_done, self._feed_prefix = 0, None

    def finalize(self, overwrite: bool) -> None:
        """Remove the resume state and rename the folder into place (replacing ``out`` with ``overwrite``).

        The finished marker goes down first: from then on the folder is complete, and a run killed before the
        rename is finished by ``--resume`` (:func:`claim`) rather than started over."""
        tmp = self.finished_marker.with_name(self.finished_marker.name + ".tmp")
        tmp.write_text(json.dumps({"build": build_id(), "settings_hash": settings_hash(self.settings),
                                   "source": self.source}) + "\n")
        os.replace(tmp, self.finished_marker)
        self._drop_state()
        self._rename_into_place(overwrite)

    def _drop_state(self) -> None:
        """Delete what only resuming needed: the manifest, the feeds, the shard spills and temporaries."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        for f in self.path.glob("*feed-*.safetensors*"):
            f.unlink()
        for f in self.path.glob(".*"):  # the state's other files (shard spills, temporaries): none is output
            if f.is_file():
                f.unlink()

    def _rename_into_place(self, overwrite: bool) -> None:
        old = None
        if self.out.exists():
            if not overwrite:
                raise UserError(f"--out {self.out} appeared while we were writing; not replacing it "
                                f"(the finished output stays in {self.path})")
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        self.finished_marker.unlink(missing_ok=True)
        # the replaced output (``old``), and any that a run killed between the two renames left (this run holds the
        # lock: no other run is between its renames now)
        for stale in self.out.parent.glob(f".{self.out.name}.old-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def finished_state(self) -> str | None:
        """"rename" when a finished run of these settings was killed before its rename, "done" when after it (the
        marker left), "other" for a finished run of other settings or another source, None otherwise."""
        if not self.finished_marker.is_file():
            return None
        try:
            m = json.loads(self.finished_marker.read_text())
        except (OSError, ValueError):
            return None
        if m.get("settings_hash") != settings_hash(self.settings) or m.get("source") != self.source:
            return "other"
        return "rename" if self.path.is_dir() else "done"



@contextlib.contextmanager
def resumable_output_dir(run: PartialRun, overwrite: bool, resume: bool):
    """Yield ``run`` with its folder in place (created, or the partial one to go on with); on success it
    becomes ``out``. A failure before the first committed layer removes it (nothing worth resuming), and
    so does bad input (a UserError: the same settings would fail again); any other failure (a crash,
    Ctrl-C, out of memory) keeps it and says how to go on."""
    made = _make_parents(missing_parents(run.out))
    if run.path.exists() and not (resume and run.exists()):
        remove_partial(run.path)  # a partial run the caller decided to discard, or one that never committed
    run.finished_marker.unlink(missing_ok=True)
    run.path.mkdir(exist_ok=True)
    try:
        yield run
    except BaseException as e:
        if isinstance(e, ResumeError):  # the partial run could not be taken up: it stays, as the message says
            pass
        elif run.layers_done == 0 or isinstance(e, UserError):
            remove_partial(run.path)
            _remove_empty(made)
        else:
            log.warning("the partial run is kept in %s (%d layers done): rerun the same command with --resume to "
                        "continue it (%s)", run.path, run.layers_done, type(e).__name__)
        raise
    run.finalize(overwrite)


class ResumeError(UserError):
    """A partial run that cannot be resumed (damaged, another build or settings): it is kept for the user."""


def remove_partial(path: Path) -> None:
    """Delete a partial run's folder, its manifest first: a deletion cut short leaves nothing to resume from."""
    (Path(path) / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


FINISHED = "finished"  # claim(): a finished run killed before its rename, now put in place


def claim(run: PartialRun, src: Path, resume: bool, overwrite: bool, inputs: tuple[Path, ...] = ()) -> dict | str | None:
    """Before a run writes ``run.out``: take its lock, settle what a killed run left, check the output path.
    Returns the manifest to resume from, None to start afresh, or :data:`FINISHED` when ``--resume`` found a
    finished run killed before its last rename and put it in place (nothing left to do). ``inputs``: other
    files the run reads (calibration data), which the output folder must not hold."""
    check_output_path(src, run.out, True, inputs=inputs)  # before the lock file goes beside it
    run.lock()
    run.finished_marker.with_name(run.finished_marker.name + ".tmp").unlink(missing_ok=True)
    state = run.finished_state()
    if state == "other" and not overwrite:
        raise UserError(f"{run.path} holds a finished run of other settings or another source; pass --overwrite "
                        "to discard it")
    if state in ("done", "other"):  # killed after the rename (only the marker left), or discarded by --overwrite
        run.finished_marker.unlink(missing_ok=True)
    elif state == "rename":
        if resume:
            if run.out.exists() and not overwrite:
                raise UserError(f"--out {run.out} exists; the finished run of these settings waits in {run.path}: "
                                "pass --overwrite to put it in place of --out")
            run._drop_state()  # a kill may have come between the marker and this cleanup
            run._rename_into_place(overwrite)
            log.info("--resume: the run had finished; its output is now in place at %s", run.out)
            return FINISHED
        if not overwrite:
            raise UserError(f"{run.path} holds the finished output of a run killed before its last step: pass "
                            "--resume to put it in place, or --overwrite to discard it")
    if resume and not overwrite and run.out.exists() and not run.exists():
        raise UserError(f"--out {run.out} is already complete: nothing to resume (--overwrite redoes it)")
    check_output_path(src, run.out, overwrite, inputs=inputs)
    return check_stale(run, resume, overwrite)


def check_stale(run: PartialRun, resume: bool, overwrite: bool) -> dict | None:
    """The manifest to resume from, or None to start afresh; UserError for a stale partial run that
    neither ``--resume`` nor ``--overwrite`` settles."""
    if not run.exists():
        if resume:  # under --overwrite too (what `moecompress run` passes for every build) this means "go on
            # where there is something to go on from", and nothing there is the usual case, not news
            (log.debug if overwrite else log.info)("--resume: no partial run at %s; starting from the first layer",
                                                   run.path)
        return None
    if resume:
        try:
            return run.check()
        except UserError as e:
            if not overwrite:
                raise
            log.warning("--resume --overwrite: %s; starting over", str(e).split(" (pass")[0])
            return None
    if overwrite:
        log.info("--overwrite: discarding the partial run at %s (%s)", run.path, run.describe())
        return None
    raise UserError(f"{run.path} holds a partial run of --out {run.out.name} ({run.describe()}): pass --resume "
                    "to continue it, or --overwrite to discard it")


def json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)
