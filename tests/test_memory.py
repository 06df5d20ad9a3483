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


def test_gc_paused_freezes_what_it_built_only_when_the_cli_asks():
    """A library caller's objects never leave the collector's view; under ``freeze_start_up`` (the CLI, whose
    process ends with os._exit) what a paused import region built is frozen, so later collections skip it."""
    import gc

    from moecompress.memory import freeze_start_up, gc_paused

    assert gc.get_freeze_count() == 0
    with gc_paused(freeze=True):
        built = [[i] for i in range(1000)]  # container objects: tracked by the collector
    assert gc.get_freeze_count() == 0
    freeze_start_up()
    try:
        with gc_paused():  # not an import region
            built = [[i] for i in range(1000)]
        assert gc.get_freeze_count() == 0
        with gc_paused(freeze=True):
            built = [[i] for i in range(1000)]
        assert gc.get_freeze_count() >= 1000
    finally:
        freeze_start_up(False)
        gc.unfreeze()
    assert gc.get_freeze_count() == 0 and len(built) == 1000


def test_a_model_built_under_the_cli_freeze_is_still_collected(tiny_ckpt):
    """``gc.freeze`` takes every object alive: were any region after start-up to freeze (the next skeleton's, a
    tokenizer's), a model alive by then would never be collected -- transformers' models can sit in reference
    cycles, and a recipe's next variant would pile up on the last one's. Under the CLI's freeze, a skeleton alive
    while another is built and a calibration tokenizer loads is still collected once dropped."""
    import gc
    import weakref

    from conftest import quick_config

    from moecompress.arch.handle import ModelHandle
    from moecompress.memory import freeze_start_up
    from moecompress.pipeline import load_calibration

    src = tiny_ckpt("qwen3_moe")
    freeze_start_up()
    try:
        model = ModelHandle.open(src).skeleton()
        model.__dict__["_cycle"] = model  # (the tiny model has no cycle of its own; the demo models have)
        refs = [weakref.ref(model), weakref.ref(model.model.layers[0].mlp)]
        other = ModelHandle.open(src).skeleton()
        load_calibration(quick_config(), src)
        del model
        gc.collect()
        assert all(r() is None for r in refs), "a region after start-up froze a live model"
        assert other is not None
    finally:
        freeze_start_up(False)
        gc.unfreeze()


def test_the_cli_process_ends_with_nothing_reported_at_exit(tiny_ckpt, tmp_path):
    """``python -m moecompress quantize`` freezes its start-up objects and ends through os._exit: the output is
    complete and nothing is printed about leaked objects (what a frozen heap did at a normal teardown)."""
    import subprocess
    import sys

    out = tmp_path / "q"
    p = subprocess.run([sys.executable, "-m", "moecompress", "quantize", str(tiny_ckpt("qwen3_moe")), "--out", str(out),
                        "--method", "rtn", "--bits", "4", "--group-size", "32"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "moecompress.json").is_file()
    assert "leak" not in (p.stdout + p.stderr).lower()
