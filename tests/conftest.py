"""Shared fixtures: tiny checkpoints of every family, built once per session (no downloads)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import socket
import sys
import zlib
from pathlib import Path

import pytest
import torch

from moecompress.arch.registry import supported_families

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # kernels run in Triton's interpreter on CPU (set before any @triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A command run in this process with ``--threads N`` sets torch's threads for the whole process: put back
    the suite's count after each test (otherwise every later test ran on one thread)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)



def pytest_configure(config):
    """Refuse at once, in one line, an interpreter that cannot run a kernel loop: triton 3.6's interpreter calls
    ``int()`` on a 1-element array, which numpy 2.4 refuses (every kernel test would fail with a TypeError)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import warnings

    import numpy
    import triton
    from packaging.version import Version

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 1.25-2.3: a deprecation only
            int(numpy.zeros(1, dtype=numpy.int32))
        refused = False
    except TypeError:
        refused = True
    if refused and Version(triton.__version__) < Version("3.7"):  # the 3.9 interpreter is fine
        raise pytest.UsageError(f"triton {triton.__version__}'s interpreter cannot run with numpy "
                                f"{numpy.__version__}: pip install 'numpy<2.4' (or a newer triton)")


FAMILIES = supported_families()
# DeepSeek-V2 proper (the tiny default is V2-Lite's greedy top-k without q LoRA): q LoRA, group-limited top-k by
# each group's best expert, scaled weights
DEEPSEEK_V2_GROUPED = dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0,
                           q_lora_rank=64)


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


def free_port() -> int:
    """A port nobody listens on now, for a torchrun rendezvous (no fixed ports: two runs may share the box)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_BAR = re.compile(r"\|.*\| *\d+/\d+ \[")  # a tqdm bar: "desc:  40%|####  | 2/5 [00:01<00:01, ...]"


def run_cli(capsys, *argv):
    """``moecompress`` in this process (the ``main()`` that ``python -m moecompress`` runs): (exit code, the
    stderr lines that are not progress bars or blank)."""
    from moecompress.cli import main

    rc = main([str(a) for a in argv])
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)  # tqdm's cursor moves
    return rc, [l for l in err.splitlines() if l.strip() and not _BAR.search(l)]


# a ZEDA run small enough for tests (settings of moecompress.zeda.config.ZedaConfig)
ZEDA_QUICK = dict(prompts=8, prompt_len=16, gen_len=12, batch=4, stage1_steps=8, stage2_steps=4, log_every=2)


def quick_config(**kw):
    """Quantization settings small enough for tests (few short calibration windows)."""
    from moecompress.settings import build_config

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


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as module ``name`` (in ``sys.modules`` while inside: dataclasses look
    their module up there)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(name, None)
