"""Every kernel family compiles for sm_90 through triton's full pipeline (bundled ptxas), no GPU needed.

The interpreter-based tests check results but not compilability; this runs
``python -m moecompress.kernels.compile_check`` in a subprocess because this pytest process may have
TRITON_INTERPRET=1 set (kernels decorated for the interpreter cannot be compiled).
"""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cache hit would skip the compile being tested
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, "-m", "moecompress.kernels.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"compile_check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
