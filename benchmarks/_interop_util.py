"""Helpers shared by the interop drivers (GPTQModel, vLLM): run our CLI, compare logits."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def moecompress_cmd() -> list[str]:
    """The ``moecompress`` console script of this interpreter's environment (or the module entry point)."""
    exe = Path(sys.executable).parent / "moecompress"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from moecompress.cli import entry; entry()"]


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output appended to ``log``; its wall seconds. Exit with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}; log {log}:\n{tail}")
    return time.perf_counter() - t0


def compare(a, ref) -> dict:
    """Relative (Frobenius) error, max |diff| and top-1 agreement of ``a`` against ``ref`` (same shape)."""
    return {"rel_err": float((a - ref).norm() / ref.norm()), "max_abs": float((a - ref).abs().max()),
            "top1_agree": float((a.argmax(-1) == ref.argmax(-1)).float().mean())}


def interpreter_missing(python: str, what: str, flag: str) -> bool:
    """Say (on stderr) that another environment's interpreter is missing; True when it is."""
    if Path(python).exists():
        return False
    print(f"{what} interpreter {python} not found: set it up (benchmarks/README.md, '{what} interop') or pass {flag}",
          file=sys.stderr)
    return True


def workdir(path: str | None, prefix: str) -> Path:
    """``path`` (created), or a new temporary folder."""
    import tempfile

    work = Path(path) if path else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def write_report(path: str, args, **fields) -> None:
    """``path``: JSON with the run's date, machine, command, arguments and main environment, then ``fields``."""
    import datetime as dt
    import json
    import os
    import platform

    import torch
    import transformers

    Path(path).write_text(json.dumps({
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
        "main_env": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        **fields}, indent=1, default=str))
