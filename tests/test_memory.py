"""release_freed_memory gives freed heap pages back: resident memory drops after a fragmenting free."""

from __future__ import annotations

import sys

import pytest
import torch

from moecompress.memory import release_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_are_returned():
    # after one ~1 MiB block is freed glibc serves blocks of that size from its heap (the mmap
    # threshold adapts); freeing every other one leaves holes it keeps mapped until trimmed
    torch.empty(1 << 18).fill_(1.0)
    blocks = [torch.ones(1 << 18) for _ in range(256)]  # 256 x 1 MiB, touched
    del blocks[::2]
    before = _rss_mib()
    assert release_freed_memory()
    after = _rss_mib()
    assert before - after > 64, f"RSS {before:.0f} -> {after:.0f} MiB: 128 MiB were freed, little came back"
    del blocks


def test_gc_paused_turns_the_collector_back_on_only_if_it_was_on():
    import gc

    from moecompress.memory import gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
