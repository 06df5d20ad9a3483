"""ZEDA's losses, as pure functions of logits and router outputs.

* :func:`forward_kl` -- stage 1, KL(teacher || student) per token over the **full vocabulary**,
  averaged over the masked positions. Full rather than the teacher's top-N: the models we train on
  a CPU have small vocabularies, and the teacher's logits are recomputed each step (no storage), so
  truncation would buy nothing and bias the gradient.
* :func:`reverse_kl` -- stage 2, KL(student || teacher) on the student's own samples.
* :func:`group_balance` -- per MoE layer, the zero group's share of the slots, averaged over
  tokens, is pulled toward the target skip rate; the loss is the mean over layers of the squared
  gap (``balance_scope="layer"``, the default). ``"model"`` steers only the mean over layers -- what the
  expert FLOPs saved depend on -- and lets the distillation decide which layers skip more; a pooled target
  can let some layers skip everything and others nothing. The share is made differentiable by the
  router's *soft slot count* (``balance="slots"``, the default: see
  ``ZeroExpertRouter._soft_skip``), or approximated by the zero group's share of the selection
  distribution (``balance="mass"``). The mass proxy works against the distillation: to hold half
  the mass the zero rows must take large weights, and a zero slot's weight scales the real experts'
  output down (it stays in the renormalization), while a slot is won by merely outranking the
  k-th real expert. The measured share of slots is what is logged.
* the real experts' relative routing: ``real_kl`` (computed by the router, see
  :class:`moecompress.zero.modules.ZeroExpertRouter`) keeps the student's distribution over the real
  experts, renormalized among themselves, close to the original's -- zero while the real rows are
  frozen, a guard when they train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over masked positions of KL(teacher || student), nats; logits ``[B, T, V]``."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return _masked_mean((lt.exp() * (lt - ls)).sum(-1), mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean over masked positions of KL(student || teacher), nats."""
    return forward_kl(student_logits, teacher_logits, mask)


def zero_mass(probs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mean over tokens of the zero group's share of ``probs [T, E+Z]``."""
    return probs[:, num_experts:].sum(-1).mean()


def group_balance(masses: list[torch.Tensor], target: float, scope: str = "layer") -> torch.Tensor:
    """``scope="layer"``: mean over layers of ``(zero-group share - target)^2``; ``"model"``: the squared gap
    of the mean share over layers (the model's share of expert compute skipped)."""
    m = torch.stack(list(masses))
    return ((m - target) ** 2).mean() if scope == "layer" else (m.mean() - target) ** 2


def balance_surrogate(glob: torch.Tensor, local: torch.Tensor, target: float, scope: str = "layer") -> torch.Tensor:
    """A loss whose gradient, averaged over the ranks, is that of :func:`group_balance` of the global per-layer
    shares ``glob`` (no gradient) with respect to this rank's ``local`` ones (first order: d(g - t)^2 = 2 (g - t) dg,
    and ``glob`` is the ranks' mean of ``local``)."""
    if scope == "layer":
        return (2.0 * (glob - target) * local).mean()
    return 2.0 * (glob.mean() - target) * local.mean()


def slot_share(ids: torch.Tensor, num_experts: int) -> float:
    """Measured share of the slots routed to zero experts (for the logs)."""
    return float((ids >= num_experts).float().mean())
