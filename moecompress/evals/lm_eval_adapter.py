"""Run EleutherAI lm-evaluation-harness tasks on a model we loaded (optional: ``pip install lm-eval``).

``MoeLM`` is an ``lm_eval`` ``TemplateLM``: lm-eval does the prompt formatting and the
context/continuation tokenization; we score token sequences with the already-loaded (dequantized)
transformers model. ``loglikelihood`` and ``loglikelihood_rolling`` are exact (no padding: requests
are batched only with requests of the same length); ``generate_until`` is greedy decoding with
transformers' ``generate``, cut at the first stop string.

Tasks are looked up in ``tasks_path`` (lm-eval's ``include_path``: a folder of task YAMLs) first,
then among lm-eval's built-in tasks; a task name may also be the path of a task YAML. Whatever the
tasks' datasets need must already be available locally when the machine is offline.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moecompress.errors import UserError

log = logging.getLogger("moecompress")
_INSTALL = "lm-eval is not installed: pip install 'moecompress[lmeval]' (or pip install lm-eval) to run --tasks"


def _lm_eval():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(_INSTALL) from None
    return TaskManager


def task_manager(tasks: list[str], tasks_path: str | None):
    """A TaskManager that knows every name in ``tasks`` (UserError naming the unknown ones)."""
    TaskManager = _lm_eval()
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise UserError(f"--tasks-path {tasks_path} is not a folder of lm-eval task YAMLs")

    def missing(tm) -> list[str]:
        return [t for t in tasks if t not in tm.all_tasks and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]

    if tasks_path is not None:  # the built-in index takes tens of seconds: skip it when not needed
        tm = TaskManager(include_path=tasks_path, include_defaults=False)
        if not missing(tm):
            return tm
    tm = TaskManager(include_path=tasks_path)
    unknown = missing(tm)
    if unknown:
        where = f" in {tasks_path} or" if tasks_path else ""
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: not found{where} among lm-eval's tasks")
    return tm


def load_tasks(tasks: list[str], manager) -> dict:
    """lm-eval's task dict (which loads every task's dataset); one line when a dataset cannot be had."""
    from lm_eval.tasks import get_task_dict

    try:
        return get_task_dict(tasks, manager)
    except OSError as e:  # ConnectionError and the hub's offline errors are OSErrors
        raise UserError(f"lm-eval task(s) {', '.join(tasks)}: a dataset could not be loaded (not in the local "
                        f"datasets cache and the Hub is unreachable?): {str(e).splitlines()[0]}") from None


def _make_lm_class():
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class MoeLM(TemplateLM):
        """lm-eval's view of a loaded causal LM and its tokenizer."""

        def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                     max_gen_toks: int = 256):
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            cfg = model.config
            self.max_length = max_length or int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
            self.max_gen_toks = max_gen_toks
            self._device = next(model.parameters()).device

        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_token_id
            return eos if eos is not None else self.tokenizer.pad_token_id or 0

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def tok_decode(self, ids) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        @torch.no_grad()
        def _logprobs(self, batch: list[list[int]]) -> torch.Tensor:
            ids = torch.tensor(batch, dtype=torch.long, device=self._device)
            return F.log_softmax(self.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            seqs = []
            for _, ctx, cont in requests:
                whole = (ctx + cont)[-(self.max_length + 1):]
                seqs.append((whole[:-1], whole[len(whole) - len(cont):]))
            order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j][0]))
            results: list = [None] * len(seqs)
            groups: list[list[int]] = []
            for j in order:  # batch only requests of equal length: no padding, exact scores
                if groups and len(groups[-1]) < self.batch_size and len(seqs[groups[-1][0]][0]) == len(seqs[j][0]):
                    groups[-1].append(j)
                else:
                    groups.append([j])
            for g in tqdm(groups, desc="lm-eval loglikelihood", disable=disable_tqdm):
                logp = self._logprobs([seqs[j][0] for j in g])
                for row, j in enumerate(g):
                    inp, cont = seqs[j]
                    lp = logp[row, len(inp) - len(cont):]
                    target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    score = float(lp.gather(-1, target[:, None]).sum())
                    greedy = bool((lp.argmax(-1) == target).all())
                    results[j] = (score, greedy)
                    if requests[j][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[j][0], results[j])
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in tqdm([r.args for r in requests], desc="lm-eval rolling", disable=disable_tqdm):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
                out.append(sum(s for s, _ in scores))
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in tqdm([r.args for r in requests], desc="lm-eval generate", disable=disable_tqdm):
                kw = dict(gen_kwargs or {})
                until = kw.get("until") or [self.tok_decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                n_new = int(kw.get("max_gen_toks", self.max_gen_toks))
                ctx = self.tok_encode(context)[-max(1, self.max_length - n_new):]
                ids = torch.tensor([ctx], dtype=torch.long, device=self._device)
                gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                          do_sample=False, pad_token_id=self.eot_token_id)
                text = self.tok_decode(gen[0, ids.shape[1]:].tolist())
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

    return MoeLM


def make_lm(model, tokenizer, batch_size: int = 8):
    """An lm-eval ``LM`` over a loaded causal LM (imports lm-eval)."""
    _lm_eval()
    return _make_lm_class()(model, tokenizer, batch_size)


def run_tasks(model, tokenizer, tasks: list[str], tasks_path: str | None = None, batch_size: int = 8,
              limit: int | None = None, manager=None) -> dict:
    """Run lm-eval ``tasks`` on ``model``; ``{"results", "n-shot", "versions", "higher_is_better"}``."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks, tasks_path)
    lm = make_lm(model.eval(), tokenizer, batch_size)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=0)
    if res is None:  # only non-zero ranks of a distributed run get None
        return {}
    keep = {k: res.get(k) for k in ("results", "groups", "n-shot", "versions", "higher_is_better") if res.get(k)}
    return _plain(json.loads(json.dumps(keep, default=str)))


def _plain(x):
    """JSON values with NaN/inf (lm-eval's missing stderr) replaced by None, so the report stays strict JSON."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
