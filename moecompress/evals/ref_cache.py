"""A cache of what the evaluator needs from the reference model, so N variants run the reference once.

What the metrics take from the reference, per batch (see :mod:`.lm_metrics`, :mod:`.routing_metrics`):

* its next-token logits ``[B, T, V]`` -- log-softmax, target log-probs, argmax and KL all need the
  full vocabulary. The cache does not store them: it stores the input of ``lm_head`` (the
  final-normed hidden states, ``[B, T, H]`` in the compute dtype, exactly as produced) and a hit
  recomputes ``lm_head(x)`` with the reference's own ``lm_head`` on the same device, dtype and
  batch shapes. That is the very operation the live model ends with, so the logits -- and every
  number built on them -- are bit-identical to the uncached path, at ``H/V`` of the size (a 151k
  vocabulary and H = 2048: 74x smaller than fp32 logits, nothing rounded);
* per MoE layer, its :class:`RouterOut` (fp32 selection scores ``[n, R]`` and top-k ids), stored
  as produced (ids as int32, read back as int64).

The key (``key`` in the file's metadata, its hash in the file name ``ref-<hash>.safetensors``)
holds everything the reference's outputs depend on: the reference folder's fingerprint (name,
size and modification time of every file, and the hash of config.json -- no hashing of weights),
the evaluation windows (token-id hash per data source, which covers the data spec, text, samples,
seq_len, seed and tokenizer; spec and text hash are stored too), batch size and mode (whole /
low-memory: the same layers on different batch shapes may round differently), device (kind, GPU
name or CPU architecture and torch threads), compute dtype, torch and transformers versions.

Size cap: an entry larger than ``max_bytes`` (default 2 GiB) is not written -- recording stops
as soon as the running size passes the cap, and the decision is logged; writing an entry evicts
the oldest other entries of the folder until the folder fits the cap too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moecompress.errors import UserError

from .routing_metrics import RouterOut

log = logging.getLogger("moecompress")

FORMAT = 1
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
_META = "moecompress.reference_cache"

__all__ = ["DEFAULT_MAX_BYTES", "reference_fingerprint", "cache_key", "Record", "Replay", "ReferenceCache"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reference_fingerprint(path) -> dict:
    """Changes whenever a file of the checkpoint folder is added, removed, resized or rewritten."""
    path = Path(path)
    files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()}
    cfg = path / "config.json"
    return {"files": files, "config_sha256": _sha(cfg.read_bytes()) if cfg.is_file() else None}


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type, "machine": platform.machine(), "threads": torch.get_num_threads()}


def cache_key(reference_dir, *, data_info: dict, windows_sha256: dict, batch_size: int, low_memory: bool,
              device: torch.device, dtype: torch.dtype, experts_implementation: str = "eager") -> dict:
    """Everything the reference's outputs depend on (module docstring); JSON-serializable."""
    import transformers

    return {
        "format": FORMAT,
        "reference": reference_fingerprint(reference_dir),
        "data": {n: {"spec": d["spec"], "text_sha256": d["text_sha256"], "windows": d["windows"],
                     "seq_len": d["seq_len"]} for n, d in data_info.items()},
        "windows_sha256": dict(windows_sha256),
        "batch_size": batch_size,
        "mode": "low_memory" if low_memory else "whole",
        "device": _device_info(torch.device(device)),
        "dtype": str(dtype).replace("torch.", ""),
        "experts_implementation": experts_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def key_hash(key: dict) -> str:
    return _sha(json.dumps(key, sort_keys=True).encode())[:24]


@dataclass
class Record:
    """The reference's outputs as a run produces them; drops everything once past ``max_bytes``."""

    max_bytes: int
    heads: dict = field(default_factory=dict)  # (batch, first window) -> lm_head input [n, T, H]
    routes: dict = field(default_factory=dict)  # layer -> {batch: RouterOut}
    nbytes: int = 0
    dropped: str | None = None

    def _grow(self, nbytes: int) -> bool:
        if self.dropped is not None:
            return False
        self.nbytes += nbytes
        if self.nbytes > self.max_bytes:
            self.drop(f"it would exceed the cap of {_mb(self.max_bytes)} (passed it at {_mb(self.nbytes)})")
            return False
        return True

    def add_head(self, b: int, w0: int, x: torch.Tensor) -> None:
        if self._grow(x.numel() * x.element_size()):
            self.heads[(b, w0)] = x.detach().cpu()

    def add_route(self, layer: int, b: int, r: RouterOut) -> None:
        if self._grow(r.probs.numel() * r.probs.element_size() + r.ids.numel() * 4):  # ids stored as int32
            out = RouterOut(r.probs.detach().cpu(), r.ids.detach().cpu(), r.num_experts)
            self.routes.setdefault(layer, {})[b] = out

    def drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
            self.heads, self.routes = {}, {}

    def tensors_and_meta(self, batch_windows: list[int], moe_layers: list[int], num_layers: int):
        heads = torch.cat([self.heads[k] for k in sorted(self.heads)]).contiguous()
        if heads.shape[0] != sum(batch_windows):
            raise RuntimeError(f"reference cache: recorded {heads.shape[0]} windows, expected {sum(batch_windows)}")
        tensors = {"head_input": heads}
        meta = {"batch_windows": batch_windows, "moe_layers": moe_layers, "num_layers": num_layers,
                "rows": {}, "num_experts": {}}
        for i in moe_layers:
            outs = [self.routes[i][b] for b in range(len(batch_windows))]
            tensors[f"probs.{i}"] = torch.cat([o.probs for o in outs]).contiguous()
            tensors[f"ids.{i}"] = torch.cat([o.ids for o in outs]).to(torch.int32).contiguous()
            meta["rows"][str(i)] = [int(o.probs.shape[0]) for o in outs]
            meta["num_experts"][str(i)] = outs[0].num_experts
        return tensors, meta


class Replay:
    """A cache entry read back: the reference's ``lm_head`` inputs and routing, batch by batch."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        self.moe_layers: list[int] = list(meta["moe_layers"])
        self.num_layers: int = int(meta["num_layers"])
        self.batch_windows: list[int] = list(meta["batch_windows"])
        self._offsets = [sum(self.batch_windows[:b]) for b in range(len(self.batch_windows))]
        self._heads = tensors["head_input"]
        self._routes: dict[int, list[RouterOut]] = {}
        for i in self.moe_layers:
            rows = meta["rows"][str(i)]
            probs = tensors[f"probs.{i}"].split(rows)
            ids = tensors[f"ids.{i}"].split(rows)
            e = int(meta["num_experts"][str(i)])
            self._routes[i] = [RouterOut(p, d, e) for p, d in zip(probs, ids)]

    def head_input(self, b: int, device, w0: int = 0, n: int | None = None) -> torch.Tensor:
        """``lm_head`` input of windows ``w0 .. w0+n`` of batch ``b`` (default: the whole batch)."""
        n = self.batch_windows[b] - w0 if n is None else n
        start = self._offsets[b] + w0
        return self._heads[start:start + n].to(device)

    def route(self, layer: int, b: int, device) -> RouterOut:
        r = self._routes[layer][b]
        return RouterOut(r.probs.to(device), r.ids.to(device).long(), r.num_experts)


def _mb(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1e6:.1f} MB"


class ReferenceCache:
    """One evaluation's view of a cache folder: ``load()`` a hit or None; ``save(record, ...)``.

    ``status`` ends as ``hit``, ``written``, ``skipped`` (with ``reason``) or ``miss`` (not written
    yet); :meth:`summary` is what the evaluation JSON records.
    """

    def __init__(self, folder, key: dict, max_bytes: int = DEFAULT_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise UserError(f"the reference cache's size cap must be an integer >= 0 bytes, got {max_bytes!r}")
        self.folder, self.key, self.max_bytes = Path(folder), key, max_bytes
        if self.folder.exists() and not self.folder.is_dir():  # refused before hours of evaluation, not after
            raise UserError(f"reference cache {self.folder} exists and is not a folder")
        self.hash = key_hash(key)
        self.path = self.folder / f"ref-{self.hash}.safetensors"
        self.status, self.reason, self.nbytes = "miss", None, 0

    def summary(self) -> dict:
        return {"path": str(self.path), "key": self.hash, "status": self.status, "reason": self.reason,
                "bytes": self.nbytes}

    # ------------------------------------------------------------------------------------- read
    def load(self) -> Replay | None:
        if not self.path.is_file():
            self.reason = "no entry for this key" + self._nearest_difference()
            log.info("reference cache: miss (%s): the reference runs and its outputs are recorded", self.reason)
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {})[_META])
            if meta.get("key") != json.loads(json.dumps(self.key)):
                raise ValueError("its key differs from its name")
            replay = Replay(load_file(str(self.path)), meta)
        except Exception as e:  # a truncated or foreign file: recompute and overwrite it
            self.reason = f"unreadable entry ({type(e).__name__}: {e})"
            log.warning("reference cache: %s is unusable (%s): the reference runs again", self.path, self.reason)
            return None
        self.status, self.nbytes = "hit", self.path.stat().st_size
        try:
            os.utime(self.path)  # most recently used: evicted last
        except OSError:  # a read-only shared cache: the entry still serves
            pass
        log.info("reference cache: hit %s (%s): the reference model is not run", self.path, _mb(self.nbytes))
        return replay

    def _nearest_difference(self) -> str:
        """Which parts of the key differ from the newest other entry of the folder (why it missed)."""
        entries = self._entries()
        if not entries:
            return ""
        try:
            with safe_open(str(entries[-1][0]), "pt") as f:
                old = json.loads((f.metadata() or {})[_META])["key"]
        except Exception:
            return ""
        new = json.loads(json.dumps(self.key))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"; the newest entry differs in {', '.join(diff)}" if diff else ""

    def _entries(self) -> list[tuple[Path, int]]:
        """``(path, bytes)`` of the folder's entries other than this key's, least recently used first."""
        found = []
        for p in self.folder.glob("ref-*.safetensors") if self.folder.is_dir() else []:
            try:
                st = p.stat()
            except OSError:  # removed meanwhile by another evaluation
                continue
            if p != self.path:
                found.append((st.st_mtime_ns, p, st.st_size))
        return [(p, size) for _, p, size in sorted(found)]

    # ------------------------------------------------------------------------------------ write
    def record(self) -> Record:
        return Record(self.max_bytes)

    def save(self, record: Record, *, batch_windows: list[int], moe_layers: list[int], num_layers: int) -> None:
        if record.dropped is not None:
            self.status, self.reason = "skipped", record.dropped
            log.info("reference cache: not written: %s", record.dropped)
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:  # the evaluation itself is done: a cache that cannot be written only costs time later
            tensors, meta = record.tensors_and_meta(batch_windows, moe_layers, num_layers)
            meta["key"] = json.loads(json.dumps(self.key))
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})
            os.replace(tmp, self.path)
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            self.status, self.reason = "skipped", f"cannot write it ({type(e).__name__}: {e})"
            log.warning("reference cache: not written: %s", self.reason)
            return
        finally:
            tmp.unlink(missing_ok=True)
        self.status, self.nbytes = "written", self.path.stat().st_size
        log.info("reference cache: wrote %s (%s)", self.path, _mb(self.nbytes))
        self._evict()

    def _evict(self) -> None:
        others = self._entries()
        total = self.nbytes + sum(size for _, size in others)
        for p, size in others:
            if total <= self.max_bytes:
                break
            total -= size
            p.unlink(missing_ok=True)
            log.info("reference cache: removed the older entry %s (the folder stays under %s)", p.name,
                     _mb(self.max_bytes))
