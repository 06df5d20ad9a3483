"""Give freed heap memory back to the operating system between layers.

A layer's weights, statistics and scratch are freed when the next layer starts, but glibc keeps
freed heap pages (fragmented arenas of many ~MB tensors) mapped: measured on a 6-layer model with
26 MB layers, resident memory crept up ~13 MB per layer, while ``malloc_trim`` after each layer kept
it flat. Peak memory then stays O(one layer) however many layers a model has.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (glibc only; a few ms); True when trimmed. No ``gc.collect``:
    layer tensors are freed by reference counting, and a full collection costs ~0.1 s per call."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


# set by the command line (``freeze_start_up``), whose process ends with ``os._exit``: what a paused import region
# built may then leave the collector's view for good
_FREEZE = False


def freeze_start_up(on: bool = True) -> None:
    """Let ``gc_paused(freeze=True)`` regions freeze what exists at their end (``gc.freeze`` takes every tracked
    object): for a process that ends without Python's teardown (``moecompress.cli._exit``), never for a library
    caller's. Only the CLI's start-up region asks for it, where nothing but imported modules exists yet: a model
    alive at a freeze would never be collected (transformers' models can sit in reference cycles).
    ``gc.unfreeze`` undoes it, as the CLI does before a normal exit."""
    global _FREEZE
    _FREEZE = on


@contextlib.contextmanager
def gc_paused(freeze: bool = False):
    """Python's cyclic collector off inside: for start-up work that builds many long-lived objects and
    little garbage (importing torch and transformers, building a model skeleton, loading a tokenizer).
    Its collections there rescan the growing heap again and again and free next to nothing: ~0.4 s of a
    9 s quantize on the 2-core box (RESULTS.md, session 13). Back on at the end (if it was on).

    ``freeze`` (start-up imports only, before any model exists), under :func:`freeze_start_up`: everything then
    alive is frozen, else the first young collection after the region scans all of it, and a later older one
    again (RESULTS.md, session 15)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze and _FREEZE:
            gc.freeze()
        if was:
            gc.enable()


def available_bytes(device) -> int:
    """Memory free for new tensors on ``device`` (a ``torch.device``): the GPU's free memory, or the host's
    available RAM."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def host_processes() -> int:
    """Processes of this launch sharing the host's RAM (torchrun's ``LOCAL_WORLD_SIZE``; 1 without it)."""
    import os

    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1
