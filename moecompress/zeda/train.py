"""`moecompress zeda`: inject zero experts, distil in two stages, write a zero-expert checkpoint.

1. The original loads once; every router gets its zero experts in memory and a warm start
   (:mod:`.student`); gradient checkpointing per decoder layer bounds the activations.
2. Stage 1 (off-policy): the teacher samples ``gen_len`` tokens after each of ``prompts`` prompts
   drawn (seeded) from ``data``; each step the student learns a batch of them with KL(teacher ||
   student) at every position, plus the group balancing loss and the real-routing guard.
3. Stage 2 (on-policy): each step the student samples continuations of a batch of prompts and
   learns KL(student || teacher) on its own tokens, plus the same regularizers.
4. The trained routers (and norms, if trained) replace the originals' in a copy of the checkpoint,
   written atomically like ``quantize``'s, with ``zeda_log.json`` (every logged step: losses, the
   share of slots on zero experts per layer) and ``zeda_curve.png``.

The teacher's logits are recomputed per step (no storage); a step costs one teacher forward and
one student forward + backward. A NaN/Inf loss stops the run with one line and writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..arch.handle import ModelHandle
from ..arch.registry import router_rule
from ..calib.specs import spec_paths
from ..checkpoint.writer import check_output_path
from ..errors import UserError
from ..zero.inject import check_num_zero, open_float_original
from ..zero.layout import ZeroExperts, text_config_dict, write_zero_experts
from ..zero.rewrite import rewrite_checkpoint
from .config import ZedaConfig
from .losses import balance_surrogate, forward_kl, group_balance, reverse_kl, slot_share, zero_mass
from ..distributed import SINGLE, Ranks
from .distributed import full, mean, share, shard_fsdp, wrap
from ..checkpoint.partial import source_fingerprint
from .resume import ResumeState
from .student import Student, build_student, teacher_mode, tracking, warm_start

log = logging.getLogger("moecompress")


def _prompts(model_dir: Path, cfg: ZedaConfig) -> torch.Tensor:
    from ..calib.chat import chat_renderer
    from ..calib.data import load_texts, make_calibration_windows
    from ..calib.specs import load_tokenizer

    tok = load_tokenizer(model_dir, "ZEDA's prompts")
    try:
        windows = make_calibration_windows(load_texts(cfg.data, chat=chat_renderer(tok)), tok, cfg.prompts,
                                           cfg.prompt_len, cfg.seed, "--prompt-len")
    except UserError as e:
        raise UserError(f"--data {cfg.data}: {e}") from None
    return windows.input_ids


def autocast(cfg: ZedaConfig, device: torch.device):
    """bf16 autocast for the forwards when ``cfg.precision`` asks for it (auto: on a GPU), else a no-op."""
    on = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@torch.no_grad()
def _sample(student: Student, prompts: torch.Tensor, cfg: ZedaConfig, seed: int, teacher: bool) -> torch.Tensor:
    """Sampled continuations ``[B, P + gen_len]`` of ``prompts`` by the teacher or the student."""
    model = student.model
    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    ctx = teacher_mode(student) if teacher else contextlib.nullcontext()
    with ctx, autocast(cfg, dev):
        out = model.generate(prompts.to(dev), max_new_tokens=cfg.gen_len, min_new_tokens=cfg.gen_len, do_sample=True,
                             temperature=cfg.temperature, top_k=0, top_p=1.0, pad_token_id=0, use_cache=True)
    return out[:, : prompts.shape[1] + cfg.gen_len]


def _step(student: Student, forward, seq: torch.Tensor, stage: int, cfg: ZedaConfig, prompt_len: int,
          d: Ranks) -> tuple[torch.Tensor, dict]:
    """This rank's loss for ``seq`` (its share of the global batch) and the step's statistics (global)."""
    model = student.model
    with torch.no_grad(), teacher_mode(student), autocast(cfg, seq.device):
        t_logits = model(input_ids=seq, use_cache=False).logits
    # (called under ``tracking``, kept on through the backward: checkpointed layers recompute the same graph)
    with autocast(cfg, seq.device):
        s_logits = forward(input_ids=seq, use_cache=False).logits
    if stage == 1:  # every position of the teacher's text
        kd = forward_kl(t_logits, s_logits)
    else:  # the positions predicting the student's own tokens
        mask = torch.zeros(seq.shape, dtype=torch.bool, device=seq.device)
        mask[:, prompt_len - 1: -1] = True
        kd = reverse_kl(s_logits, t_logits, mask)
    routers = list(student.routers.values())
    if cfg.balance == "slots":
        local = torch.stack([r.aux["soft_skip"].mean() for r in routers])
    else:
        local = torch.stack([zero_mass(r.aux["probs"], r.num_experts) for r in routers])
    glob = mean(d, local)  # every layer's share over the whole global batch
    bal = group_balance(list(glob), cfg.target_skip, cfg.balance_scope)
    # first-order surrogate: averaged over the ranks, its gradient is exactly that of ``bal`` (see .distributed)
    bal_grad = balance_surrogate(glob, local, cfg.target_skip, cfg.balance_scope)
    kls = [r.aux["real_kl"] for r in routers if "real_kl" in r.aux]
    route = torch.stack(kls).mean() if kls else torch.zeros((), device=seq.device)
    loss = kd + cfg.balance_weight * bal_grad + cfg.route_weight * route
    skips = mean(d, torch.tensor([slot_share(r.aux["ids"], r.num_experts) for r in routers]))
    kd_g, route_g = (float(mean(d, x)) for x in (kd, route))
    stats = {"kd": kd_g, "balance": float(bal), "route": route_g,
             "loss": kd_g + cfg.balance_weight * float(bal) + cfg.route_weight * route_g,
             "zero_share": [float(m) for m in glob],
             "skip": {str(i): float(x) for i, x in zip(student.routers, skips)}}
    return loss, stats


def train(student: Student, prompts: torch.Tensor, cfg: ZedaConfig, resume: ResumeState | None = None,
          d: Ranks = SINGLE) -> list[dict]:
    """Both stages; returns the log (one entry per ``log_every`` steps and at each stage's end).

    Every ``checkpoint_every`` steps ``resume`` (when given) saves what the next step needs: the
    trainable parameters, the optimizer, the batch sampler's state, the step and the log. Restarted
    from there, the run takes exactly the steps it would have taken (each step's data and sampling
    seed follow from the step number), so on a CPU the result is bit for bit an uninterrupted run's.
    """
    model = student.model
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # 5.17 (the GPU image's)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if d.active and cfg.shard == "fsdp":
        student.params = shard_fsdp(model, student.params)  # sharding makes new parameter objects
        forward = model
    else:
        forward = wrap(d, model)  # DDP across ranks: gradients averaged in the backward
    groups = [{"params": student.params, "lr": cfg.lr, "base_lr": cfg.lr}]
    if student.lora:
        groups.append({"params": student.lora, "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start = 0
    if resume is not None and resume.exists():
        start, history = resume.load(student, opt, gen)
        for g, (name, lr) in zip(opt.param_groups, (("lr", cfg.lr), ("lora_lr", cfg.lora_lr))):
            if g["base_lr"] != lr:  # a resume may lower the rates (after a NaN): said, and recorded
                log.warning("zeda: resuming at step %d with --%s %g (the run so far used %g)", start,
                            name.replace("_", "-"), lr, g["base_lr"])
                resume.rate_changes.append({"step": start, "setting": name, "from": g["base_lr"], "to": lr})
                g["base_lr"] = lr
        log.info("zeda: resuming at step %d of %d from %s", start, cfg.stage1_steps + cfg.stage2_steps, resume.path)
    p_len = prompts.shape[1]
    teacher_text = None
    if cfg.stage1_steps > start:  # the teacher's samples: deterministic, so a resumed run regenerates them
        model.eval()
        # every rank samples all of it (the same seeds): the shares of any global batch are then at hand
        teacher_text = torch.cat([_sample(student, prompts[b:b + cfg.batch], cfg, cfg.seed * 7919 + b, teacher=True)
                                  for b in tqdm(range(0, prompts.shape[0], cfg.batch), desc="teacher generations",
                                                unit="batch", leave=False, disable=not d.main)])
    model.train()
    total = cfg.stage1_steps + cfg.stage2_steps
    bar = tqdm(total=total, initial=start, desc="zeda", unit="step", disable=not d.main)
    for step in range(start, total):
        stage = 1 if step < cfg.stage1_steps else 2
        s = step if stage == 1 else step - cfg.stage1_steps
        steps = cfg.stage1_steps if stage == 1 else cfg.stage2_steps
        idx = torch.randint(0, prompts.shape[0], (cfg.batch,), generator=gen)
        if stage == 1:
            seq = teacher_text[idx]
        else:  # the whole global batch on every rank (same seed), so the shares do not depend on the ranks
            model.eval()
            seq = _sample(student, prompts[idx], cfg, cfg.seed * 104729 + step, teacher=False)
            model.train()
        seq = share(d, seq.to(next(model.parameters()).device))
        warm = min(1.0, (step + 1) / 10)  # 10 steps of linear warm-up
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warm
        with tracking(student):
            loss, stats = _step(student, forward, seq, stage, cfg, p_len, d)
            if not math.isfinite(stats["loss"]):
                kept = f"; the last good checkpoint (step {resume.saved_step}) is kept in {resume.path}" \
                    if resume is not None and resume.saved_step is not None else ""
                raise UserError(f"ZEDA loss became {stats['loss']} at step {step + 1} (stage {stage}): stopping, no "
                                f"model written{kept}; try a lower --lr (a resume may change it)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        # each group clipped on its own: the adapters' gradients would otherwise shrink the routers' steps
        torch.nn.utils.clip_grad_norm_(student.params, 1.0)
        if student.lora:
            torch.nn.utils.clip_grad_norm_(student.lora, 1.0)
        opt.step()
        mean_skip = sum(stats["skip"].values()) / max(len(stats["skip"]), 1)
        bar.set_postfix_str(f"stage {stage} kd {stats['kd']:.4f} bal {stats['balance']:.4f} skip {mean_skip:.2f}")
        bar.update()
        if s % cfg.log_every == 0 or s == steps - 1:
            history.append(dict(stats, stage=stage, step=step + 1, mean_skip=mean_skip))
            log.debug("stage %d step %d: %s", stage, step + 1, history[-1])
        if resume is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            resume.save(step + 1, student, opt, gen, history, d.main)  # every rank: sharded tensors are gathered
            d.barrier()
    bar.close()
    model.eval()
    return history


def curve_png(history: list[dict]) -> bytes | None:
    """The training curves (losses, share of slots on zero experts) as PNG bytes; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("kd", "balance", "route"):
        a.plot(steps, [h[key] for h in history], label=key)
    a.set_yscale("symlog", linthresh=1e-4)
    a.set_xlabel("step")
    a.set_title("losses (kd: stage 1 forward KL, stage 2 reverse KL)")
    a.legend()
    layers = sorted(history[0]["skip"]) if history else []
    for i in layers:
        b.plot(steps, [h["skip"][i] for h in history], lw=0.8, alpha=0.6, label=f"layer {i}")
    b.plot(steps, [h["mean_skip"] for h in history], color="black", lw=2, label="mean")
    b.set_xlabel("step")
    b.set_title("share of slots on zero experts")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        s2 = next((h["step"] for h in history if h["stage"] == 2), None)
        if s2 is not None:
            ax.axvline(s2, color="gray", ls="--", lw=1)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def trained_values(student: Student) -> dict[str, torch.Tensor]:
    """``{parameter name: whole tensor}`` of everything that trained (a collective under FSDP2: every rank
    calls it), LoRA adapters excluded (they are merged at export)."""
    return {n: full(p.detach()) for n, p in student.model.named_parameters() if p.requires_grad and ".lora_" not in n}


def export(student: Student, model_dir: Path, out_dir: Path, cfg: ZedaConfig, record: dict, overwrite: bool,
           extra_files: dict[str, bytes], trained: dict[str, torch.Tensor] | None = None) -> dict:
    """The original checkpoint with the trained routers (and norms) and the zero-expert config; ``trained``:
    the values to write (default: :func:`trained_values`)."""
    handle = ModelHandle.open(model_dir)
    trained = trained_values(student) if trained is None else trained
    merged = {}
    if student.lora:
        from .lora import merged_experts

        merged = merged_experts(student.model)  # W + B A of every adapted expert tensor

    def layer_fn(i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {handle.output_name(n): t for n, t in tensors.items()}
        r = student.routers.get(i)
        prefix = f"model.layers.{i}."
        if r is not None:
            name = handle.source_name(i, "mlp.gate.weight")
            out[handle.output_name(name)] = trained[prefix + "mlp.gate.weight"].cpu().to(tensors[name].dtype)
            bias = r.selection_bias()
            if bias is not None:
                bname = handle.source_name(i, handle.spec.bias_name)
                stored = tensors[bname]
                out[handle.output_name(bname)] = bias.detach().cpu().to(stored.dtype).reshape(
                    (1, -1) if stored.dim() == 2 else (-1,))
            if r.rs.scoring == "softmax":  # sigmoid routers keep no zero logit bias (the stock layout has none)
                out[handle.output_name(name).removesuffix("weight") + "zero_expert_bias"] = \
                    trained[prefix + "mlp.gate.zero_expert_bias"].float().cpu()
        for mem, p in trained.items():
            if mem.startswith(prefix) and ".gate." not in mem:
                src = handle.source_name(i, mem[len(prefix):])
                out[handle.output_name(src)] = p.cpu().to(tensors[src].dtype)
        for mem, w in merged.items():
            if mem.startswith(prefix):
                out.update(_expert_tensors(handle, i, mem[len(prefix):], w.cpu(), tensors))
        return out

    zero = ZeroExperts(student.zero.num_zero, "native", None, cfg.topk_mode, cfg.zero_weights, cfg.zero_logits)
    config = write_zero_experts(handle.reader.config, zero)
    text_config_dict(config)[handle.spec.top_k_attr] = handle.top_k + (1 if cfg.topk_mode == "plus-one" else 0)
    return rewrite_checkpoint(handle, out_dir, config, layer_fn, record, overwrite, desc="writing",
                              extra_files=extra_files)


def _expert_tensors(handle: ModelHandle, i: int, local: str, w: torch.Tensor, tensors: dict) -> dict:
    """Layer i's fused expert tensor ``w`` (``mlp.experts.gate_up_proj [E, 2I, H]`` or ``down_proj [E, H, I]``)
    under the names and dtypes the checkpoint stores it with: fused as it is, or per expert."""
    fused = handle.fused_source(i, local)
    if fused is not None:
        return {handle.output_name(fused): w.to(tensors[fused].dtype)}
    out = {}
    for e in range(w.shape[0]):
        gate, up, down = (n + ".weight" for n in handle.expert_source_names(i, e))
        if local.endswith("gate_up_proj"):
            half = w.shape[1] // 2
            parts = {gate: w[e, :half], up: w[e, half:]}
        else:
            parts = {down: w[e]}
        out.update({handle.output_name(n): t.contiguous().to(tensors[n].dtype) for n, t in parts.items()})
    return out


def run_zeda(model_dir: str | Path, out_dir: str | Path, cfg: ZedaConfig, overwrite: bool = False,
             command: list[str] | None = None, resume: bool = False, rates_may_change: bool = True) -> dict:
    """Train and write ``out_dir``; ``resume`` continues a killed run of the same settings from its
    last training checkpoint (see :mod:`.resume`), the learning rates aside unless ``rates_may_change`` is
    False (a recipe's automatic resume: a changed rate there is a changed recipe)."""
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    handle = open_float_original(model_dir, "run ZEDA on")
    if handle.zero is not None:
        raise UserError(f"{model_dir} already has {handle.num_zero} zero experts; run ZEDA on the original model")
    handle.check_context(cfg.prompt_len + cfg.gen_len, f"--prompt-len + --gen-len: {cfg.prompt_len} + {cfg.gen_len} =")
    if cfg.trainable == "lora":
        from .lora import _peft

        _peft()  # one line now, not after the teacher's generations, when peft is missing
    if cfg.shard == "fsdp" and cfg.trainable != "routers":
        raise UserError(f"--shard fsdp trains the routers only for now, not --trainable {cfg.trainable}; use --shard ddp")
    if cfg.layout == "stock":
        why = _stock_blocker(handle, cfg)
        if why:
            raise UserError(f"--layout stock: {why}; write the native layout (the default)")
    # k - 1 by default: every token keeps at least one real expert (measured: with k zero experts the
    # student learns to send some tokens to none, which costs far more than it saves; RESULTS.md)
    num_zero = cfg.num_zero or max(1, handle.top_k - 1)
    check_num_zero(num_zero, handle.num_experts)
    check_output_path(model_dir, out_dir, overwrite, inputs=spec_paths(cfg.data))
    from ..devices import resolve_device

    device = resolve_device(cfg.device)
    if cfg.shard != "fsdp":  # before the process group exists: a refusal leaves nothing to tear down
        _check_fits(model_dir, handle, device)
    d = Ranks.from_env(device.type)
    if cfg.shard == "fsdp" and not d.active:
        log.warning("--shard fsdp shards across torchrun ranks; this single process trains the whole model")
    try:
        return _run(model_dir, out_dir, cfg, overwrite, command, resume, num_zero, torch.device(d.device(str(device))),
                    d, t0, rates_may_change)
    finally:
        d.close()


def _check_fits(model_dir: Path, handle: ModelHandle, device: torch.device) -> None:
    """One line, before anything is loaded, where the fp32 student alone exceeds the device's free memory
    (a CPU's RAM shared by the launch's processes): an out-of-memory kill says nothing."""
    from .. import memory
    from ..evals.sizes import model_bytes

    need = model_bytes(handle, torch.float32, packed=False)
    need *= 1 if device.type == "cuda" else memory.host_processes()
    free = memory.available_bytes(device)
    if need > free:
        raise UserError(f"{model_dir}: ZEDA holds the model in fp32, {need / 2**30:.1f} GiB before activations, and "
                        f"{device} has {free / 2**30:.1f} GiB free; use a bigger device, or shard it over several "
                        "with torchrun ... --shard fsdp")


def _run(model_dir: Path, out_dir: Path, cfg: ZedaConfig, overwrite: bool, command, resume: bool, num_zero: int,
         device: torch.device, d: Ranks, t0: float, rates_may_change: bool = True) -> dict:
    if cfg.batch % d.world:
        raise UserError(f"--batch {cfg.batch} must be a multiple of the {d.world} ranks")
    state = ResumeState(out_dir, cfg.model_dump(), source_fingerprint(model_dir), rates_may_change)
    if state.exists() and resume and overwrite:  # resume a matching partial run, else start over
        try:
            state.check()
        except UserError as e:
            log.warning("zeda: --resume --overwrite: %s; starting over", str(e).split(" (pass")[0])
            resume = False
    if state.exists():
        if resume:
            state.check()
        elif overwrite:
            d.barrier()  # every rank has seen it before rank 0 removes it
            if d.main:
                state.discard()
        else:
            raise UserError(f"{state.path} holds a partial ZEDA run for --out {out_dir}: pass --resume to continue "
                            "it, or --overwrite to start over")
    elif resume:  # under --overwrite too (what `moecompress run` passes): nothing there is the usual case
        (log.debug if overwrite else log.info)("zeda: nothing to resume in %s; starting from the beginning",
                                               state.path)
    d.barrier()
    torch.manual_seed(cfg.seed)
    prompts = _prompts(model_dir, cfg)
    student = build_student(model_dir, num_zero, cfg.topk_mode, cfg.seed, cfg.trainable, device, torch.float32,
                            cfg.zero_weights, cfg.zero_logits, cfg.lora_rank)
    student.model.generation_config.eos_token_id = None
    bias0 = warm_start(student, prompts[: cfg.batch])
    history = train(student, prompts, cfg, state, d)
    trained = trained_values(student)  # on every rank: gathers sharded parameters under FSDP2
    record = {"moecompress_version": __version__, "command": command, "source": str(model_dir.resolve()),
              "recipe": cfg.model_dump(),
              "zero_experts": {"action": "zeda", "num_zero": num_zero, "topk_mode": cfg.topk_mode,
                               "weights": cfg.zero_weights, "logits": cfg.zero_logits,
                               "target_skip": cfg.target_skip, "warm_start_bias": bias0,
                               "final": history[-1] if history else None},
              "ranks": d.world, "timings_s": {"total": time.perf_counter() - t0},
              **({"rate_changes": state.rate_changes} if state.rate_changes else {})}
    if not d.main:  # rank 0 writes; the others wait for it
        d.barrier()
        return record
    files = {"zeda_log.json": (json.dumps({"settings": cfg.model_dump(), "history": history}, indent=2) + "\n").encode()}
    png = curve_png(history) if history else None
    if png is not None:
        files["zeda_curve.png"] = png
    try:
        if cfg.layout == "stock":
            out = _export_stock(student, model_dir, out_dir, cfg, record, overwrite, files, trained)
        else:
            out = export(student, model_dir, out_dir, cfg, record, overwrite, files, trained)
        state.discard()
    finally:
        d.barrier()
    return out


def _stock_blocker(handle: ModelHandle, cfg: ZedaConfig) -> str | None:
    """Why a ZEDA model of these settings could not be written in the stock layout (None: it can)."""
    if cfg.zero_weights != "renormalized":
        return f"--zero-weights {cfg.zero_weights} weighs slots in a way stock loaders cannot (use renormalized)"
    if cfg.zero_logits != "linear":
        return f"--zero-logits {cfg.zero_logits} needs each token's best real logit, which stock loaders lack (use linear)"
    if handle.spec.scoring == "softmax":
        return f"{handle.family}'s softmax router gives the zero experts a trained logit bias, which stock routers lack"
    if router_rule(handle.spec, handle.text_config).n_group is not None:
        return "group-limited routing would put the zero experts into the groups in stock loaders"
    return None


def _export_stock(student: Student, model_dir: Path, out_dir: Path, cfg: ZedaConfig, record: dict, overwrite: bool,
                  files: dict[str, bytes], trained) -> dict:
    """:func:`export` to a hidden sibling, then ``zero-experts convert`` of it into ``out_dir`` (atomic as every
    rewrite); the output's moecompress.json is ZEDA's record, noting the layout."""
    from ..zero.convert import convert_layout

    native = out_dir.resolve().parent / f".{out_dir.resolve().name}.zeda-native"
    shutil.rmtree(native, ignore_errors=True)
    try:
        export(student, model_dir, native, cfg, record, True, files, trained)
        convert_layout(native, out_dir, "stock", overwrite, record.get("command"))
    finally:
        shutil.rmtree(native, ignore_errors=True)
    record = dict(record, layout="stock")
    tmp = Path(out_dir) / ".moecompress.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, Path(out_dir) / "moecompress.json")
    return record
