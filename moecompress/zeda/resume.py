"""Resumable ZEDA runs: an atomic training checkpoint beside the output folder.

``.<out>.zeda-resume/state.pt`` holds what the next step needs -- the trainable parameters, the
zero rows' selection biases, the optimizer, the batch sampler's RNG state, the step and the log --
plus the run's settings and a fingerprint of the source checkpoint. It is replaced atomically
(written to a temporary file, then renamed), so a kill at any moment leaves the previous one intact.
It is read with ``torch.load(weights_only=True)``: tensors and plain values only, never code.
A successful run removes it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..build_id import build_id, check_same_build
from ..errors import UserError

# settings a resumed run may change without changing the result (logging, checkpoints)
VOLATILE = ("log_every", "checkpoint_every")
# and those an explicit --resume may change on purpose: the learning rates, lowered after a loss that became NaN
# (the resumed run then differs from an uninterrupted one; moecompress.json records the change)
RATES = ("lr", "lora_lr")


class ResumeState:
    def __init__(self, out_dir: Path, settings: dict, source: str, rates_may_change: bool = True):
        out_dir = Path(out_dir).resolve()
        self.path = out_dir.parent / f".{out_dir.name}.zeda-resume"
        self.settings = {k: v for k, v in settings.items() if k not in VOLATILE}
        self.free = RATES if rates_may_change else ()  # settings check() lets differ
        self.rate_changes: list[dict] = []  # filled by the training loop when a resume changed a rate
        self.source = source
        self.saved_step: int | None = None

    @property
    def file(self) -> Path:
        return self.path / "state.pt"

    def exists(self) -> bool:
        return self.file.is_file()

    def _read(self) -> dict:
        try:
            return torch.load(self.file, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so in one line
            raise UserError(f"cannot read the ZEDA resume state {self.file}: {type(e).__name__}: {e}; "
                            "pass --overwrite to start over") from None

    def check(self) -> None:
        """UserError naming the first difference when the saved run is not this run."""
        state = self._read()
        check_same_build(json.loads(state["build"]) if "build" in state else None, self.path)
        if state["source"] != self.source:
            raise UserError(f"{self.path} is a ZEDA run of another source checkpoint (or it changed since); "
                            "pass --overwrite to start over")
        saved = json.loads(state["settings"])
        for k in sorted(set(saved) | set(self.settings)):
            if k not in self.free and saved.get(k) != self.settings.get(k):
                raise UserError(f"cannot resume {self.path}: setting '{k}' was {saved.get(k)!r}, now "
                                f"{self.settings.get(k)!r} (pass the same settings, or --overwrite to start over)")

    def save(self, step: int, student, opt, gen: torch.Generator, history: list[dict], write: bool = True) -> None:
        """Every rank calls it (sharded tensors are gathered whole); only ``write`` ranks write."""
        from .distributed import full, full_state

        params = {n: full(p.detach()).cpu().clone() for n, p in student.model.named_parameters() if p.requires_grad}
        opt_state = full_state(opt.state_dict())
        self.saved_step = step
        if not write:
            return
        buffers = {f"router.{i}.e_score_correction_bias": r.selection_bias().detach().cpu().clone()
                   for i, r in student.routers.items() if r.selection_bias() is not None}
        state = {"step": step, "params": params, "buffers": buffers, "opt": opt_state,
                 "gen": gen.get_state(), "history": json.dumps(history), "settings": json.dumps(self.settings),
                 "source": self.source, "build": json.dumps(build_id())}
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".state.pt.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.file)

    def load(self, student, opt, gen: torch.Generator) -> tuple[int, list[dict]]:
        """The saved state into the (possibly sharded) parameters and optimizer; every rank reads the file."""
        from .distributed import shard_like

        state = self._read()
        named = dict(student.model.named_parameters())
        with torch.no_grad():
            for n, t in state["params"].items():
                named[n].copy_(shard_like(t, named[n]))
            for i, r in student.routers.items():
                b = state["buffers"].get(f"router.{i}.e_score_correction_bias")
                if b is not None:
                    r.selection_bias().copy_(b)
        # the optimizer's per-parameter tensors (Adam's moments) laid out like their parameters
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, st in state["opt"]["state"].items():
            p = params[int(idx)]
            for k, v in st.items():
                if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                    st[k] = shard_like(v, p)
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        self.saved_step = int(state["step"])
        return self.saved_step, json.loads(state["history"])

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
