"""`quantize` on several processes: torch.distributed, launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

    torchrun --nproc-per-node 8 -m moecompress quantize MODEL --out OUT --device cuda ...

Who does what, per decoder layer (every rank holds the layer being quantized):

* **Calibration**: the batches of calibration windows are grouped into ``reduce_chunks`` fixed chunks
  (contiguous runs of batches; the count does not depend on the number of ranks). Chunk ``c`` belongs to
  rank ``c mod N``: that rank alone runs the chunk's forward passes and keeps its hidden states.
* **Statistics**: each chunk's Hessians and token counts are summed from zero over its batches, then the
  chunks are added *in chunk order*: the per-expert Hessian sums of each block of ``expert_chunk`` experts
  on the rank that solves that block only (point to point from each chunk's rank), everything else (token
  counts, the layer-wide sums, dense linears' Hessians) on every rank (broadcast one chunk at a time). The
  sums are the same sequence of floating-point operations whatever N is, so 1, 2 or 3 ranks give
  byte-identical checkpoints (and one process is just N = 1). AWQ keeps every expert's sums on every rank:
  its scale search reads them all.
* **Solving**: the experts of a projection are split in blocks of ``expert_chunk``, and the dense linears
  (attention, shared experts) are spread over the ranks; each owner solves its part (and its error
  records) and the parts are broadcast, so every rank holds the whole quantized layer to feed the next one.
* **Tuning** (``--tune-steps``): each step's batch is the one a single process would take; the rank that
  holds it computes the step and broadcasts its signs (``quant.tune``), so every rank moves the codes alike.
* **Output**: rank 0 writes the checkpoint, the resume state and ``moecompress.json`` (rank count and
  per-rank timings, bytes received, peak statistics held); every rank keeps only its own chunks' hidden
  states.

A rank receives the other chunks' replicated statistics and 1/N of their expert sums per layer
(``benchmarks/quantize_scaling.py`` models it byte for byte), and holds about 1/N of the expert sums.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Ranks:
    """This process's place in the run (one process: rank 0 of 1, and every collective is the identity)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm_bytes: int = 0  # what this rank received through collectives (statistics and solved parts)
    comm_s: float = 0.0
    timings: dict = field(default_factory=dict)
    owns_group: bool = False  # this process started the group (a step of `moecompress run` joins its caller's)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: str) -> "Ranks":
        """The process group torchrun describes in the environment (none: a single process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        cuda = device.startswith("cuda")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            if not torch.cuda.is_available():
                raise UserError("--device cuda was asked for but no CUDA device is available")
            torch.cuda.set_device(local)
        owns = not dist.is_initialized()
        if owns:
            # long: in `moecompress run` the other ranks wait while rank 0 runs a step alone (a skipping
            # baseline, lm-eval tasks, a benchmark); a rank that dies is noticed by torchrun at once, not by
            # this timeout
            timeout = datetime.timedelta(seconds=int(os.environ.get("MOECOMPRESS_DIST_TIMEOUT", str(24 * 3600))))
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=owns)

    def device(self, requested: str) -> str:
        """``cuda:LOCAL_RANK`` for a multi-rank GPU run, else the requested device."""
        if self.active and requested.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def all_gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable: tensors are moved to the CPU first), in rank order."""
        if not self.active:
            return [obj]
        t0 = time.perf_counter()
        out = [None] * self.world
        dist.all_gather_object(out, _to_cpu(obj))
        self.comm_s += time.perf_counter() - t0
        self.comm_bytes += sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != self.rank)
        return out

    def broadcast_flat(self, flat: torch.Tensor, src: int) -> torch.Tensor:
        """``flat`` (1-D) of rank ``src``, on the collective's device (the CPU under gloo, this rank's GPU under
        NCCL); the others pass a tensor of the same length and dtype to fill."""
        if not self.active:
            return flat
        t0 = time.perf_counter()
        t = flat.to(self._comm_device()).contiguous()
        dist.broadcast(t, src=src)
        self.comm_s += time.perf_counter() - t0
        if src != self.rank:
            self.comm_bytes += t.numel() * t.element_size()
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Point to point (from the collective's device: the CPU under gloo, this rank's GPU under NCCL)."""
        t0 = time.perf_counter()
        dist.send(t.to(self._comm_device()).contiguous(), dst=dst)
        self.comm_s += time.perf_counter() - t0

    def recv(self, shape: tuple, dtype: torch.dtype, src: int) -> torch.Tensor:
        t0 = time.perf_counter()
        t = torch.empty(shape, dtype=dtype, device=self._comm_device())
        dist.recv(t, src=src)
        self.comm_s += time.perf_counter() - t0
        self.comm_bytes += t.numel() * t.element_size()
        return t

    def comm_device(self) -> torch.device:
        """Where collectives take their tensors: the CPU under gloo (or one process), this rank's GPU under NCCL."""
        return self._comm_device() if self.active else torch.device("cpu")

    @staticmethod
    def _comm_device() -> torch.device:
        return torch.device("cpu") if dist.get_backend() == "gloo" else torch.device("cuda", torch.cuda.current_device())

    def gather_solved(self, parts: dict[int, tuple], owner_of) -> dict[int, tuple]:
        """Every rank's solved parts ``{start: (QuantizedWeight, per-member infos)}``, on every rank:
        the small things as objects, the tensors broadcast from their owner (NCCL moves them device to
        device; nothing large is pickled)."""
        if not self.active:
            return parts
        from .quant.spec import QuantizedWeight

        metas = self.all_gather_objects({s: _part_meta(p) for s, p in parts.items()})
        meta = {s: m for d in metas for s, m in d.items()}
        t0 = time.perf_counter()
        gloo = dist.get_backend() == "gloo"
        dev = torch.device("cpu") if gloo else torch.device("cuda", torch.cuda.current_device())
        out = {}
        for s in sorted(meta):
            infos, spec, shapes = meta[s]
            src = owner_of(s)
            local = _part_tensors(parts[s]) if src == self.rank else {}
            got = {}
            for name, (shape, dtype) in shapes.items():
                t = local[name].to(dev).contiguous() if src == self.rank else torch.empty(shape, dtype=dtype, device=dev)
                dist.broadcast(t, src=src)
                if src != self.rank:
                    self.comm_bytes += t.numel() * t.element_size()
                got[name] = t
            qw = QuantizedWeight(got["qweight"], got["scales"], got["zeros"], spec, got.get("g_idx"))
            out[s] = parts[s] if src == self.rank else (qw, infos)
        self.comm_s += time.perf_counter() - t0
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [_to_cpu(obj) if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]


SINGLE = Ranks()


def chunk_batches(num_batches: int, reduce_chunks: int) -> list[range]:
    """The fixed chunks: ``min(reduce_chunks, num_batches)`` contiguous, near-equal runs of batches."""
    n = max(1, min(reduce_chunks, num_batches))
    base, extra = divmod(num_batches, n)
    out, start = [], 0
    for c in range(n):
        size = base + (1 if c < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _part_tensors(part: tuple) -> dict[str, torch.Tensor]:
    qw = part[0]
    out = {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros}
    if qw.g_idx is not None:
        out["g_idx"] = qw.g_idx
    return out


def _part_meta(part: tuple):
    return part[1], part[0].spec, {k: (tuple(v.shape), v.dtype) for k, v in _part_tensors(part).items()}


def to_device(obj, device):
    """``obj`` with every tensor in it (nested in dicts, lists, tuples, dataclasses) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _to_cpu(obj):
    return to_device(obj, "cpu")
