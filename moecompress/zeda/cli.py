"""``moecompress zeda``: the click layer over :func:`moecompress.zeda.train.run_zeda`."""

from __future__ import annotations

import sys

import click

from ..units import SEED_MAX, nonempty_path


@click.command("zeda")
@click.argument("model_dir")
@click.option("--out", required=True, callback=nonempty_path, help="Output folder (must not exist unless --overwrite).")
@click.option("--num-zero", type=int, default=None, help="Zero experts per router (default: top-k - 1, so a token keeps one real expert).")
@click.option("--topk-mode", type=click.Choice(["same", "plus-one"]), default="same", show_default=True)
@click.option("--zero-weights", type=click.Choice(["original", "renormalized"]), default="original", show_default=True,
              help="original: kept experts keep the original router's weights (zero experts drop the lowest slots); "
                   "renormalized: a zero slot's weight stays in the renormalization (what stock loaders compute).")
@click.option("--zero-logits", type=click.Choice(["relative", "linear"]), default="relative", show_default=True,
              help="relative: a zero row's logit adds the token's best real logit; linear: a plain router row.")
@click.option("--target-skip", type=float, default=0.5, show_default=True, help="Share of slots to skip, in (0, 1).")
@click.option("--data", default="builtin:stdlib", show_default=True, help="Prompt text (same forms as --calib).")
@click.option("--prompts", type=int, default=256, show_default=True)
@click.option("--prompt-len", type=int, default=32, show_default=True)
@click.option("--gen-len", type=int, default=64, show_default=True)
@click.option("--stage1-steps", type=int, default=120, show_default=True)
@click.option("--stage2-steps", type=int, default=60, show_default=True)
@click.option("--lr", type=float, default=5e-3, show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--balance-weight", type=float, default=1.0, show_default=True)
@click.option("--route-weight", type=float, default=1.0, show_default=True,
              help="Weight of the guard keeping the real experts' relative routing (when their rows train).")
@click.option("--balance", type=click.Choice(["slots", "mass"]), default="slots", show_default=True,
              help="What the balancing loss steers: a soft count of zero slots, or the zero rows' probability mass.")
@click.option("--balance-scope", type=click.Choice(["layer", "model"]), default="layer", show_default=True,
              help="Steer every layer's zero share to --target-skip, or only their mean (layers may then differ).")
@click.option("--trainable", type=click.Choice(["routers", "zero-rows", "routers+norms", "lora"]), default="routers",
              show_default=True, help="zero-rows: the real experts' router rows stay the original's; lora: the "
                                      "routers and a LoRA adapter per routed expert (needs peft), merged at export.")
@click.option("--lora-rank", type=int, default=8, show_default=True, help="--trainable lora: the adapters' rank.")
@click.option("--lora-lr", type=float, default=1e-3, show_default=True, help="--trainable lora: the adapters' learning rate.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Forwards under bf16 autocast (auto: on a GPU; fp32 on a CPU); routers always compute in fp32.")
@click.option("--shard", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="Under torchrun: ddp holds the whole model on every rank; fsdp shards it (FSDP2), for models that "
                   "do not fit one device.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--layout", type=click.Choice(["native", "stock"]), default="native", show_default=True,
              help="stock: zero experts as all-zero experts that stock transformers/vLLM load (needs --zero-weights "
                   "renormalized --zero-logits linear and a sigmoid router without groups).")
@click.option("--resume", is_flag=True, help="Continue a killed run of the same settings from its last checkpoint.")
@click.option("--checkpoint-every", type=int, default=20, show_default=True, help="Steps between resumable checkpoints.")
@click.option("--overwrite", is_flag=True)
def zeda(model_dir, out, num_zero, topk_mode, zero_weights, zero_logits, target_skip, data, prompts, prompt_len, gen_len, stage1_steps,
         stage2_steps, lr, batch, balance_weight, route_weight, balance, balance_scope, trainable, lora_rank, lora_lr, device, precision, shard, seed, layout, resume, checkpoint_every,
         overwrite) -> None:
    """Teach MODEL_DIR to skip experts: zero experts + two-stage self-distillation from itself."""
    from ..cli import start_up

    with start_up():
        from ..checkpoint.hub import local_model
        from .config import build_zeda_config
        from .train import run_zeda

    cfg = build_zeda_config("cli", num_zero=num_zero, topk_mode=topk_mode, zero_weights=zero_weights, zero_logits=zero_logits,
                            target_skip=target_skip, data=data,
                            prompts=prompts, prompt_len=prompt_len, gen_len=gen_len, stage1_steps=stage1_steps,
                            stage2_steps=stage2_steps, lr=lr, batch=batch, balance_weight=balance_weight, route_weight=route_weight, balance=balance, balance_scope=balance_scope,
                            trainable=trainable, lora_rank=lora_rank, lora_lr=lora_lr, device=device, precision=precision, shard=shard, seed=seed, layout=layout,
                            checkpoint_every=checkpoint_every)
    # a Hub repository: fetched once the settings (and --out) are valid
    model_dir = local_model(model_dir, out=out, overwrite=overwrite, resume=resume)
    with start_up(model_dir):  # the family's code, before any model exists
        pass
    rec = run_zeda(model_dir, out, cfg, overwrite=overwrite, command=sys.argv, resume=resume)
    final = rec["zero_experts"]["final"] or {}
    click.echo(f"wrote {out}: {rec['zero_experts']['num_zero']} zero experts per router, final share of slots "
               f"skipped {100 * final.get('mean_skip', 0):.1f}% (target {100 * target_skip:.0f}%) in "
               f"{rec['timings_s']['total']:.0f}s")
