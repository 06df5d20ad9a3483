"""Small, pure language-model metrics on fixed token windows: perplexity, KL to a reference, top-1 agreement.

Every function takes a causal LM (anything whose ``model(input_ids=...)`` returns logits ``[B, T, V]``,
either as a tensor or as an output object with ``.logits``; Hugging Face models also get
``use_cache=False``) and a LongTensor ``input_ids [N, T]`` of full windows (no padding), runs it in
batches of ``batch_size`` windows under ``torch.no_grad()``, and does all the arithmetic in fp32
whatever the model's dtype. Nothing is cached or mutated; the models are not put in eval mode
(callers do that).

* :func:`token_logprobs` -- ``[N, T-1]`` log-probability of each actual next token;
* :func:`perplexity` -- ``exp(-mean(token_logprobs))`` over every predicted position;
* :func:`kl_and_top1` -- mean over all ``N*T`` positions of ``KL(ref || model)`` of the next-token
  distributions (nats), and the share of positions where both argmaxes agree.

The evaluator, which produces logits itself (whole models or streamed layer by layer), uses the
pure pieces: :func:`logit_sums` reduces one batch of logits of both models to sums, and
:class:`LMAccumulator` adds them up per dataset and turns them into the same three numbers.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["token_logprobs", "perplexity", "kl_and_top1", "logit_sums", "LMAccumulator"]


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[B, T, V]`` of ``model`` on ``ids`` (moved to the model's device)."""
    ids = ids.to(_device(model))
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None else {}
    out = model(input_ids=ids, **kwargs)
    logits = out if torch.is_tensor(out) else out.logits
    return logits.float()


def _check(input_ids: torch.Tensor, batch_size: int, min_len: int = 1) -> None:
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor [N, T], got {tuple(input_ids.shape)} {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] < min_len:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} needs >= 1 window of >= {min_len} tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def token_logprobs(model, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """fp32 ``[N, T-1]`` (CPU): ``log p(input_ids[:, t+1] | input_ids[:, :t+1])`` for every window."""
    _check(input_ids, batch_size, min_len=2)
    rows = []
    for b in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[b:b + batch_size]
        logp = F.log_softmax(_logits(model, ids)[:, :-1], dim=-1)
        target = ids[:, 1:].to(logp.device)
        rows.append(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu())
    return torch.cat(rows)


def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over all ``N*(T-1)`` predicted positions."""
    lp = token_logprobs(model, input_ids, batch_size)
    return ppl_of(-float(lp.double().mean()))


def ppl_of(mean_nll: float) -> float:
    """``exp(mean_nll)``, saturating at the largest float: a model broken enough to lose more than ~709 nats
    per token (finite but enormous logits) still gets its evaluation written, strict JSON and all."""
    return math.exp(mean_nll) if mean_nll < math.log(sys.float_info.max) else sys.float_info.max


@torch.no_grad()
def kl_and_top1(model, ref_model, input_ids: torch.Tensor, batch_size: int = 8) -> tuple[float, float]:
    """``(mean KL(ref || model) in nats, top-1 agreement)`` over all ``N*T`` positions of ``input_ids``.

    KL(ref || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)): the expected extra loss, per
    token, of predicting with ``model`` text that ``ref_model`` would produce. Agreement is the share
    of positions where ``argmax`` of both logit vectors is the same token.
    """
    _check(input_ids, batch_size)
    kl_sum, agree, count = 0.0, 0, 0
    for b in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[b:b + batch_size]
        ref = _logits(ref_model, ids)
        out = _logits(model, ids).to(ref.device)
        if out.shape != ref.shape:
            raise ValueError(f"logit shapes differ: model {tuple(out.shape)} vs reference {tuple(ref.shape)}")
        logp_ref = F.log_softmax(ref, dim=-1)
        logp = F.log_softmax(out, dim=-1)
        kl = F.kl_div(logp, logp_ref, log_target=True, reduction="none").sum(-1)  # sum p_ref (log p_ref - log p)
        kl_sum += float(kl.double().sum())
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        count += kl.numel()
    return kl_sum / count, agree / count


def logit_sums(logits: torch.Tensor, ref_logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """Sums over one batch ``[B, T, V]`` of both models' logits on ``input_ids [B, T]``.

    ``nll`` / ``nll_ref``: summed next-token negative log-likelihoods over the ``B*(T-1)`` predicted
    positions (``n_pred``); ``kl``: summed KL(ref || model) and ``agree``: positions with equal
    argmax, over all ``B*T`` positions (``n_pos``).
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: model {tuple(logits.shape)} vs reference {tuple(ref_logits.shape)}")
    ref = ref_logits.float()
    out = logits.float().to(ref.device)
    logp_ref, logp = F.log_softmax(ref, dim=-1), F.log_softmax(out, dim=-1)
    target = input_ids[:, 1:].to(ref.device).unsqueeze(-1)
    kl = F.kl_div(logp, logp_ref, log_target=True, reduction="none").sum(-1)
    return {
        "nll": -float(logp[:, :-1].gather(-1, target).double().sum()),
        "nll_ref": -float(logp_ref[:, :-1].gather(-1, target).double().sum()),
        "n_pred": target.numel(),
        "kl": float(kl.double().sum()),
        "agree": int((ref.argmax(-1) == out.argmax(-1)).sum()),
        "n_pos": kl.numel(),
    }


class NonFiniteLogits(Exception):
    """NaN/Inf among the logits of ``which`` ("model" or "reference") on dataset ``name``'s windows."""

    def __init__(self, which: str, name: str):
        super().__init__(which, name)
        self.which, self.name = which, name


@dataclass
class LMAccumulator:
    """Per-dataset :func:`logit_sums`; ``result()`` gives perplexities, KL and top-1 agreement."""

    sums: dict[str, dict[str, float]] = field(default_factory=dict)

    def update(self, name: str, logits: torch.Tensor, ref_logits: torch.Tensor, input_ids: torch.Tensor) -> None:
        for which, t in (("model", logits), ("reference", ref_logits)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteLogits(which, name)
        acc = self.sums.setdefault(name, {})
        for k, v in logit_sums(logits, ref_logits, input_ids).items():
            acc[k] = acc.get(k, 0) + v

    def merge(self, other: "LMAccumulator") -> "LMAccumulator":
        """Add another accumulator's sums (another rank's windows) into this one."""
        for name, sums in other.sums.items():
            acc = self.sums.setdefault(name, {})
            for k, v in sums.items():
                acc[k] = acc.get(k, 0) + v
        return self

    def result(self) -> dict:
        s = self.sums
        pos = sum(v["n_pos"] for v in s.values())
        return {
            "ppl": {n: ppl_of(v["nll"] / v["n_pred"]) for n, v in s.items()},
            "ppl_reference": {n: ppl_of(v["nll_ref"] / v["n_pred"]) for n, v in s.items()},
            "kl": sum(v["kl"] for v in s.values()) / pos,
            "top1_agreement": sum(v["agree"] for v in s.values()) / pos,
            "kl_per_dataset": {n: v["kl"] / v["n_pos"] for n, v in s.items()},
            "top1_per_dataset": {n: v["agree"] / v["n_pos"] for n, v in s.items()},
        }
