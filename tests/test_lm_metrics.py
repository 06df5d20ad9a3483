"""moecompress/evals/lm_metrics.py on constructed models whose perplexity / KL / agreement are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from moecompress.evals.lm_metrics import kl_and_top1, perplexity, token_logprobs

V = 11


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]] + shift[t] (optionally in another dtype)."""

    def __init__(self, table: torch.Tensor, shift: torch.Tensor | None = None, dtype=torch.float32):
        super().__init__()
        self.table = torch.nn.Parameter(table.to(dtype), requires_grad=False)
        self.shift = shift

    def forward(self, input_ids):
        logits = self.table[input_ids]
        if self.shift is not None:
            logits = logits + self.shift[: input_ids.shape[1]].to(logits.dtype)
        return logits


def _ids(n=5, t=9, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def test_uniform_model_perplexity_is_vocab_size():
    m = Bigram(torch.zeros(V, V))
    assert perplexity(m, _ids()) == pytest.approx(V, rel=1e-6)
    assert torch.allclose(token_logprobs(m, _ids()), torch.full((5, 8), -math.log(V)))


def test_bigram_perplexity_matches_hand_computation():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = _ids(4, 7, seed=2)
    nll = 0.0
    for row in ids.tolist():
        for a, b in zip(row[:-1], row[1:]):
            logits = table[a].tolist()
            nll += math.log(sum(math.exp(x) for x in logits)) - logits[b]
    expected = math.exp(nll / (4 * 6))
    for bs in (1, 3, 4, 100):  # batching does not change the answer
        assert perplexity(Bigram(table), ids, batch_size=bs) == pytest.approx(expected, rel=1e-5)


def test_identical_models_kl_zero_agreement_one():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(3))
    kl, top1 = kl_and_top1(Bigram(table), Bigram(table.clone()), _ids(), batch_size=2)
    assert kl == pytest.approx(0.0, abs=1e-7)
    assert top1 == 1.0


def test_constant_shift_of_logits_changes_nothing():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4))
    shifted = Bigram(table, shift=torch.full((9, V), 3.0) * torch.arange(9.0)[:, None])
    kl, top1 = kl_and_top1(shifted, Bigram(table), _ids())
    assert kl == pytest.approx(0.0, abs=1e-6)
    assert top1 == 1.0


def test_known_shift_gives_closed_form_kl_and_agreement():
    """ref logits = b*e1 everywhere; the model adds a*e0 at even positions only (a > b flips the argmax).

    At a shifted position KL(p||q) = sum_j p_j (r_j - m_j) + log(Zq/Zp) = -a/Zp + log(Zq/Zp) with
    Zp = e^b + V - 1, Zq = e^a + e^b + V - 2; elsewhere it is 0.
    """
    a, b, t = 2.5, 1.0, 8
    base = torch.zeros(V, V)
    base[:, 1] = b
    shift = torch.zeros(t, V)
    shift[0::2, 0] = a
    zp, zq = math.exp(b) + V - 1, math.exp(a) + math.exp(b) + V - 2
    kl_shifted = -a / zp + math.log(zq / zp)
    kl, top1 = kl_and_top1(Bigram(base, shift), Bigram(base), _ids(6, t), batch_size=4)
    assert kl == pytest.approx(kl_shifted / 2, rel=1e-5)  # half of the positions are shifted
    assert top1 == pytest.approx(0.5)
    # the direction matters: KL(model || ref) is a different number
    kl_rev, _ = kl_and_top1(Bigram(base), Bigram(base, shift), _ids(6, t))
    assert abs(kl_rev - kl) > 1e-3


def test_low_precision_model_is_evaluated_in_fp32():
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5)) * 4
    ids = _ids()
    bf16 = Bigram(table, dtype=torch.bfloat16)
    exact = Bigram(table.bfloat16().float())  # the same logits, upcast before any arithmetic
    assert perplexity(bf16, ids) == pytest.approx(perplexity(exact, ids), rel=1e-6)
    kl, top1 = kl_and_top1(bf16, exact, ids)
    assert kl == pytest.approx(0.0, abs=1e-7) and top1 == 1.0


def test_bad_inputs_raise():
    m = Bigram(torch.zeros(V, V))
    with pytest.raises(ValueError):
        perplexity(m, torch.zeros(4, 1, dtype=torch.long))  # nothing to predict
    with pytest.raises(ValueError):
        perplexity(m, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError):
        kl_and_top1(m, m, _ids(), batch_size=0)
    with pytest.raises(ValueError):
        kl_and_top1(m, Bigram(torch.zeros(V + 1, V + 1)), _ids())


def test_hf_model_matches_its_own_loss(tiny_ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt("qwen3_moe"), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert perplexity(model, ids, batch_size=2) == pytest.approx(math.exp(loss), rel=1e-4)
    kl, top1 = kl_and_top1(model, model, ids, batch_size=2)
    assert kl == pytest.approx(0.0, abs=1e-7) and top1 == 1.0


def test_a_perplexity_past_the_float_range_saturates_and_writes(tmp_path):
    """A broken model (finite, enormous logits) loses more than ~709 nats a token: its evaluation still ends
    and writes strict JSON (math.exp would raise OverflowError after the whole evaluation)."""
    import sys

    from moecompress.evals.lm_metrics import ppl_of
    from moecompress.evals.output import write_json_atomic

    assert ppl_of(1.0) == math.e and ppl_of(709.0) == math.exp(709.0)
    assert ppl_of(710.0) == sys.float_info.max == ppl_of(1e6)
    write_json_atomic(tmp_path / "e.json", {"ppl": {"x": ppl_of(900.0)}})
