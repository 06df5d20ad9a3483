"""``moecompress zero-experts add|convert|baseline``: the click layer over :mod:`moecompress.zero`."""

from __future__ import annotations

import sys

import click

from ..units import SEED_MAX, nonempty_path
from .layout import LAYOUTS, RULES, TOPK_MODES


@click.group("zero-experts")
def zero_experts() -> None:
    """Zero-output experts (ZEDA): add them, change their layout, or calibrate a skipping baseline."""


@zero_experts.command("add")
@click.argument("model_dir")
@click.option("--out", required=True, callback=nonempty_path, help="Output folder (must not exist unless --overwrite).")
@click.option("--num-zero", type=int, required=True, help="Zero experts per MoE router (Z).")
@click.option("--topk-mode", type=click.Choice(TOPK_MODES), default="same", show_default=True,
              help="same: zero experts compete for the k slots; plus-one: k+1 slots, one more that may skip.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True, help="Seed of the new router rows.")
@click.option("--overwrite", is_flag=True)
def add(model_dir, out, num_zero, topk_mode, seed, overwrite) -> None:
    """Add Z zero experts to every MoE router of MODEL_DIR (native layout; outputs unchanged with 'same')."""
    from ..checkpoint.hub import local_model
    from .inject import add_zero_experts

    model_dir = local_model(model_dir, out=out, overwrite=overwrite)  # a Hub repository: fetched
    rec = add_zero_experts(model_dir, out, num_zero, topk_mode, seed=seed, overwrite=overwrite, command=sys.argv)
    z = rec["zero_experts"]
    click.echo(f"wrote {out}: {num_zero} zero experts in {len(z['layers'])} MoE layers, "
               f"top-k {z['top_k']['before']} -> {z['top_k']['after']} ({topk_mode})")


@zero_experts.command("convert")
@click.argument("model_dir")
@click.option("--out", required=True, callback=nonempty_path, help="Output folder (must not exist unless --overwrite).")
@click.option("--layout", type=click.Choice(LAYOUTS), required=True,
              help="native: router rows only (our runtime skips them); stock: zero-weight experts any loader reads.")
@click.option("--overwrite", is_flag=True)
def convert(model_dir, out, layout, overwrite) -> None:
    """Rewrite a zero-expert MODEL_DIR in the other layout (same outputs)."""
    from ..checkpoint.hub import local_model
    from .convert import convert_layout

    model_dir = local_model(model_dir, out=out, overwrite=overwrite)  # a Hub repository: fetched
    convert_layout(model_dir, out, layout, overwrite=overwrite, command=sys.argv)
    click.echo(f"wrote {out} ({layout} layout)")


@zero_experts.command("baseline")
@click.argument("model_dir")
@click.option("--rule", type=click.Choice(RULES), required=True,
              help="threshold: drop slots under beta x the top weight; top-p: keep until p of the weight; "
                   "top-k: keep the k' heaviest.")
@click.option("--target-skip", type=float, required=True, help="Share of expert slots to skip, in (0, 1).")
@click.option("--out", required=True, callback=nonempty_path, help="Output folder (must not exist unless --overwrite).")
@click.option("--calib", default="builtin:stdlib", show_default=True, help="Calibration text (same forms as quantize).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True)
def baseline(model_dir, rule, target_skip, out, calib, calib_samples, seq_len, seed, device, overwrite) -> None:
    """Calibrate a training-free skipping rule on MODEL_DIR to --target-skip and write the rule model."""
    from ..checkpoint.hub import local_model
    from .baselines import make_baseline

    model_dir = local_model(model_dir, out=out, overwrite=overwrite)  # a Hub repository: fetched
    rec = make_baseline(model_dir, out, rule, target_skip, calib=calib, samples=calib_samples, seq_len=seq_len,
                        seed=seed, device=device, overwrite=overwrite, command=sys.argv)
    b = rec["zero_experts"]["baseline"]
    click.echo(f"wrote {out}: {rule} = {b['value']:g} skips {100 * b['calibration_skip']:.1f}% of the calibration "
               f"slots (target {100 * target_skip:.1f}%)")
