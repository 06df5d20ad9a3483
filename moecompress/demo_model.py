"""A small *trained* Qwen3-MoE model, built in minutes on a CPU from text every Python install has.

Random tiny checkpoints (:mod:`moecompress.tiny`) exercise code paths but cannot show what
quantization does to a model: their weights carry no information. The demo model is a real (if
small) language model of Python source and the pydoc prose:

* a byte-level BPE tokenizer (``tokenizers``, vocab :data:`RECIPE` ``vocab_size``) trained on the
  ``builtin:stdlib`` calibration text only;
* a ``Qwen3MoeForCausalLM`` (8 routed experts, top-2, ``norm_topk_prob``) trained with AdamW on
  windows of that same text, plus a per-layer load-balancing loss so that every expert is used;
  initialised wide (see ``init_std``) so that rounding its weights costs measurable loss;
* saved with ``save_pretrained`` in bfloat16 (like real MoE checkpoints, and half the size)
  with the tokenizer and ``demo_model.json`` (recipe, losses, held-out perplexities, expert load,
  timings, the hash of the text it was trained on).

The held-out text (``builtin:heldout-code`` / ``builtin:heldout-prose``) is never trained on.
``demo_model_path()`` caches the build under ``$MOECOMPRESS_CACHE`` (default
``~/.cache/moecompress``) in a folder named after a hash of the recipe, the seed and the Python
version (the stdlib text depends on it); it is built into a temporary sibling and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .evals.lm_metrics import perplexity

log = logging.getLogger("moecompress.demo")

RECIPE_VERSION = 1
TRAIN_TEXT = "builtin:stdlib"
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
# One thread: the matrices are small enough that a second thread buys little on a quiet 2-core
# machine, while on a busy one OpenMP threads waiting for each other made a training step 25x
# slower (measured: 0.31 s vs 8.2 s); and the result does not depend on the core count.
TRAIN_THREADS = 1

# Every linear's input dim (hidden 128, heads*head_dim 128, moe_intermediate 128) is a multiple of
# 128, so group sizes 32/64/128 all fit. Narrow on purpose: a few CPU minutes buy ~1.4M training
# tokens, which a small model puts to use.
RECIPE: dict[str, Any] = dict(
    version=RECIPE_VERSION,
    vocab_size=2048,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    # Std of the linear (and router, lm_head) weights at init: above 1/sqrt(hidden), where
    # transformers' default is 0.02. With 0.02 a briefly trained model keeps its function in a few
    # large low-rank directions (measured: top-4 singular values hold ~70% of the energy) and
    # shrugs off rounding noise: RTN at 3 bits raised perplexity by 0.1-1%. With a wide init the
    # trained model builds on all of its weights, so rounding them costs loss, as in a large,
    # well-trained model (0.1: +4-5%, 0.14: +7-9%).
    init_std=0.14,
    # The embeddings start small so the residual stream is learned (anisotropic) rather than
    # random: that is what GPTQ's Hessian exploits (measured at init_std 0.1: GPTQ's gain over RTN
    # went from 1.1% to 2.1% of held-out code perplexity, and the model got better).
    embed_init_std=0.02,
    seq_len=256,
    batch_size=8,
    steps=700,
    lr=3e-3,
    warmup_steps=20,
    min_lr_ratio=0.1,
    weight_decay=0.01,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    # Switch-style load balancing computed per layer (transformers' own aux loss pools the router
    # logits of all layers, which lets single layers collapse onto a few experts)
    router_aux_loss_coef=0.05,
    save_dtype="bfloat16",
    eval_windows=32,
)
QUICK_OVERRIDES: dict[str, Any] = dict(steps=150, eval_windows=8)
# Named variants of the recipe. "wide" has the expert layout of production MoEs (64 fine-grained
# experts, top-8, like OLMoE; Qwen3-30B-A3B has 128, top-8) at the demo's width: per-expert
# overheads of a quantizer (one GPTQ problem and one Hessian hook per expert projection) show
# there as they do on real checkpoints, where the 8-expert demo model hides them.
VARIANTS: dict[str, dict[str, Any]] = {
    "demo": {},
    "wide": dict(num_experts=64, num_experts_per_tok=8),
}


def recipe(*, seed: int = 0, steps: int | None = None, quick: bool = False, variant: str = "demo") -> dict[str, Any]:
    """The full recipe of a build (what the cache key hashes)."""
    if variant not in VARIANTS:
        raise UserError(f"unknown demo model variant {variant!r}; choose from {', '.join(VARIANTS)}")
    r = dict(RECIPE, **VARIANTS[variant], **(QUICK_OVERRIDES if quick else {}))
    if variant != "demo":  # the default variant keeps the cache key it always had
        r["variant"] = variant
    if steps is not None:
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        r["steps"] = steps
    r.update(seed=seed, quick=quick, train_text=TRAIN_TEXT, python=".".join(map(str, sys.version_info[:3])))
    return r


def recipe_hash(r: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOECOMPRESS_CACHE") or Path.home() / ".cache" / "moecompress").expanduser()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder (``cache_dir``, else the default); UserError now if it cannot be a folder."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    what = f"--cache {cache_dir}" if cache_dir is not None else f"the cache folder {path}"
    p = path
    while not p.exists() and p != p.parent:  # the first existing folder on the way up must be one
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{what} is not a folder" + (f" ({p} is a file)" if p != path else ""))
    return path


def demo_model_path(cache_dir: str | Path | None = None, *, seed: int = 0, steps: int | None = None,
                    quick: bool = False, build: bool = True, variant: str = "demo") -> Path:
    """``<cache>/demo-<recipe hash>``, built there first (atomically) when missing and ``build``."""
    r = recipe(seed=seed, steps=steps, quick=quick, variant=variant)
    path = cache_root(cache_dir) / f"demo-{recipe_hash(r)}"
    if build and not (path / "demo_model.json").is_file():
        log.info("building the demo model into %s (a few minutes, once)", path)
        try:
            build_demo_model(path, seed=seed, steps=steps, quick=quick, log=log.info, variant=variant)
        except UserError:
            if not (path / "demo_model.json").is_file():  # not a concurrent build that finished first
                raise
    return path


# --------------------------------------------------------------------------------------- building


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_tokenizer(documents, vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens) trained on ``documents``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1],
                                   model_max_length=1 << 20)


def model_config(r: dict[str, Any], tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=r["vocab_size"], hidden_size=r["hidden_size"], num_hidden_layers=r["num_hidden_layers"],
        num_attention_heads=r["num_attention_heads"], num_key_value_heads=r["num_key_value_heads"],
        head_dim=r["head_dim"], num_experts=r["num_experts"], num_experts_per_tok=r["num_experts_per_tok"],
        moe_intermediate_size=r["moe_intermediate_size"], intermediate_size=4 * r["hidden_size"],
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4 * r["seq_len"],
        tie_word_embeddings=False, router_aux_loss_coef=r["router_aux_loss_coef"], output_router_logits=False,
        initializer_range=r["init_std"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        use_cache=True,
    )


def load_balancing_loss(router_logits, top_k: int) -> torch.Tensor:
    """Mean over layers of ``E * sum_e f_e P_e`` (f: share of top-k assignments, P: mean router
    probability); 1 when balanced. One term per layer, so no layer can collapse behind the others."""
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        total = total + probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum()
    return total / len(router_logits)


def _lr(step: int, r: dict[str, Any]) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    t = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
    return r["lr"] * (r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def build_demo_model(out_dir: str | Path, *, seed: int = 0, steps: int | None = None, quick: bool = False,
                     threads: int | None = TRAIN_THREADS, log=None, variant: str = "demo") -> Path:
    """Train the demo tokenizer and model and write them to ``out_dir`` (which must not exist or be empty).

    ``threads``: torch threads while building (None: leave torch's setting). ``log``: a callable
    taking one line of progress.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty")
    r = recipe(seed=seed, steps=steps, quick=quick, variant=variant)
    say = log or (lambda msg: None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with _threads(threads):
            info = _build(tmp, r, say)
        (tmp / "demo_model.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above), unless a concurrent build filled it meanwhile
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "demo_model.json").is_file():  # someone else's build did not win either
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build of the same recipe won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _build(tmp: Path, r: dict[str, Any], say) -> dict[str, Any]:
    from transformers import Qwen3MoeForCausalLM

    from .calib.data import load_texts, make_calibration_windows

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    texts = load_texts(TRAIN_TEXT)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts.documents, r["vocab_size"])
    timings["tokenizer"] = time.perf_counter() - t0
    say(f"tokenizer: {len(tokenizer)} tokens ({timings['tokenizer']:.1f}s)")

    t0 = time.perf_counter()
    n_windows = r["steps"] * r["batch_size"]
    train = make_calibration_windows(texts, tokenizer, n_windows, r["seq_len"], r["seed"], warn_overlap=False)
    timings["data"] = time.perf_counter() - t0
    if train.metadata["windows_overlap"]:
        say("note: the training windows overlap (more steps than distinct windows)")

    torch.manual_seed(r["seed"])
    model = Qwen3MoeForCausalLM(model_config(r, tokenizer)).train()
    if r["embed_init_std"] is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, r["embed_init_std"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r["lr"], betas=tuple(r["betas"]))
    t0 = time.perf_counter()
    losses, aux_losses = [], []
    bs = r["batch_size"]
    for step in range(r["steps"]):
        for g in opt.param_groups:
            g["lr"] = _lr(step, r)
        ids = train.input_ids[step * bs:(step + 1) * bs]
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                               ids[:, 1:].reshape(-1))
        aux = load_balancing_loss(out.router_logits, r["num_experts_per_tok"])
        (ce + r["router_aux_loss_coef"] * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ce.item())
        aux_losses.append(aux.item())
        if step % 25 == 0 or step == r["steps"] - 1:
            say(f"step {step:4d}  loss {losses[-1]:.3f}  aux {aux_losses[-1]:.3f}  ({time.perf_counter() - t0:.0f}s)")
    timings["train"] = time.perf_counter() - t0
    del opt

    model = model.eval()
    code_ids = heldout_windows(tokenizer, "builtin:heldout-code", n=r["eval_windows"], seq_len=r["seq_len"])
    fp32_code_loss = math.log(perplexity(model, code_ids))  # what rounding to save_dtype costs
    model = model.to(getattr(torch, r["save_dtype"]))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    # evaluate what was saved: the stored weights, run in fp32
    t0 = time.perf_counter()
    model = model.float()
    evals = {}
    for spec in ("builtin:heldout-code", "builtin:heldout-prose"):
        ids = code_ids if spec == "builtin:heldout-code" else heldout_windows(
            tokenizer, spec, n=r["eval_windows"], seq_len=r["seq_len"])
        evals[spec] = {"loss": math.log(perplexity(model, ids)), "expert_load": expert_load(model, ids)}
    timings["eval"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    tail = losses[-max(1, min(50, len(losses) // 5)):]
    # code and prose windows together (per spec, prose is mostly routed to fewer experts: the
    # training text is mostly code)
    both = [[(a + b) / 2 for a, b in zip(la, lb)] for la, lb in zip(*(e["expert_load"] for e in evals.values()))]
    info = {
        "recipe": r,
        "train_text": {"spec": TRAIN_TEXT, "text_hash": texts.text_hash, "n_documents": texts.n_documents,
                       "tokens_seen": n_windows * r["seq_len"], "windows_overlap": train.metadata["windows_overlap"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(tail) / len(tail),
        "final_aux_loss": sum(aux_losses[-len(tail):]) / len(tail),
        "train_loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
        "uniform_loss": math.log(len(tokenizer)),
        "heldout": {spec: {"loss": e["loss"], "perplexity": math.exp(e["loss"]), "windows": r["eval_windows"],
                           "seq_len": r["seq_len"]} for spec, e in evals.items()},
        "heldout_code_loss_fp32_before_saving": fp32_code_loss,
        "expert_load": {**{spec: e["expert_load"] for spec, e in evals.items()},
                        "code+prose": [[round(x, 4) for x in layer] for layer in both]},
        "min_expert_share": round(min(min(layer) for layer in both), 4),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }
    say("held-out loss: " + ", ".join(f"{s} {e['loss']:.3f}" for s, e in evals.items())
        + f"; min expert share {info['min_expert_share']:.3f}; {timings['total']:.0f}s")
    return info


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ------------------------------------------------------------------------------------- evaluating


def heldout_windows(tokenizer, spec: str = "builtin:heldout-code", n: int = 32, seq_len: int = 256,
                    seed: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` token windows of held-out text (deterministic given the seed)."""
    from .calib.data import load_texts, make_calibration_windows

    return make_calibration_windows(load_texts(spec), tokenizer, n, seq_len, seed).input_ids


@torch.no_grad()
def heldout_perplexity(model, tokenizer, spec: str = "builtin:heldout-code", n: int = 32, seq_len: int = 256,
                       seed: int = 0) -> float:
    """Perplexity of ``model`` on ``n`` held-out windows of ``seq_len`` tokens."""
    was_training = model.training
    model.eval()
    try:
        return perplexity(model, heldout_windows(tokenizer, spec, n, seq_len, seed))
    finally:
        model.train(was_training)


@torch.no_grad()
def expert_load(model, input_ids: torch.Tensor, batch_size: int = 8) -> list[list[float]]:
    """Per MoE layer, each expert's share of the top-k token-expert assignments (sums to 1)."""
    counts = None
    for b in range(0, input_ids.shape[0], batch_size):
        out = model(input_ids=input_ids[b:b + batch_size], output_router_logits=True, use_cache=False)
        k = model.config.num_experts_per_tok
        per_layer = [torch.bincount(logits.float().topk(k, dim=-1).indices.reshape(-1),
                                    minlength=logits.shape[-1]) for logits in out.router_logits]
        counts = per_layer if counts is None else [c + p for c, p in zip(counts, per_layer)]
    return [[round(float(x), 4) for x in (c / c.sum())] for c in counts]
