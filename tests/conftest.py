"""Shared fixtures: tiny checkpoints of every family, built once per session (no downloads)."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # kernels run in Triton's interpreter on CPU (set before any @triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "qwen3_5_moe", "glm4_moe_lite"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(family, **save_tiny kwargs) -> path of a cached tiny checkpoint."""
    from moecompress.tiny import save_tiny

    cache: dict = {}

    def make(family: str, **kw):
        key = (family, repr(sorted(kw.items())))  # repr: list-valued config overrides are unhashable
        if key not in cache:
            name = family + "".join(f"_{k}-{v}" for k, v in sorted(kw.items())).replace("torch.", "")
            cache[key] = save_tiny(family, tmp_path_factory.mktemp("ckpt") / name, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def quick_demo_cache(tmp_path_factory):
    """A cache folder holding the quick demo model, trained once per session (~1 minute) for every test
    that needs it: ``moecompress.demo_model.demo_model_path(quick_demo_cache, quick=True)``."""
    from moecompress.demo_model import demo_model_path

    cache = tmp_path_factory.mktemp("demo_cache")
    demo_model_path(cache, quick=True)
    return cache


def quick_config(**kw):
    """Quantization settings small enough for tests (few short calibration windows)."""
    from moecompress.recipe import build_config

    base = dict(group_size=32, calib_samples=8, seq_len=64, batch_size=4)
    if str(kw.get("method", "")).startswith("awq"):
        base["awq_grid"] = 5  # each grid point runs the clip search over every reader: keep tests short
    if kw.get("method") == "rtn":
        base["measure_errors"] = False  # tests of RTN skip the diagnostic calibration unless they ask
    base.update(kw)
    return build_config(**base)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's name: fresh inputs per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def poisoned():
    """Kernel outputs allocated by the launchers start as NaN, so unwritten elements are caught."""
    from moecompress.kernels.testing import poisoned_buffers

    with poisoned_buffers():
        yield
