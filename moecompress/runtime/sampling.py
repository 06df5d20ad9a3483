"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"temperature must be > 0 when sampling, got {self.temperature} (0, or --greedy, "
                            "takes the most likely token)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must lie in (0, 1], got {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.greedy else torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Token ids ``[B]`` from fp32 ``logits [B, V]``.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (always at
    least the most likely one, so a tiny ``top_p`` is greedy).
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= params.top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
