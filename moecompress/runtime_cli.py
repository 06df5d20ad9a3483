"""``moecompress generate`` and ``moecompress plan``: the click layer over the runtime (imported when
run: this module stays light, so that `moecompress --help` does not import torch)."""

from __future__ import annotations

import click

from .errors import UserError
from .units import SEED_MAX, parse_size


@click.command()
@click.argument("model_dir")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--greedy", is_flag=True, help="Always take the most likely token (ignores temperature/top-p).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="0 is greedy, like --greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: fp32 on CPU, the checkpoint's dtype on GPU.")
@click.option("--cpu-weights", type=click.Choice(["packed", "exact", "dequantized"]), default="packed",
              show_default=True, help="CPU, quantized checkpoints: packed (torch's int4/int8 CPU kernels, bf16 "
              "activations into them), exact (packed, fp32 math), dequantized (float weights at --dtype: 4-8x the memory).")
@click.option("--offload-experts", default=None, metavar="auto|N",
              help="GPU: keep N routed experts per layer on the device (or 'auto': as many as --vram allows, "
                   "the most used first) and run the rest from host memory on the CPU.")
@click.option("--vram", default=None, help="With --offload-experts auto: GPU memory to use, e.g. 6GiB.")
@click.option("--load", "load_json", default=None, help="With --offload-experts: an `eval` JSON whose measured "
              "expert load decides which experts stay on the GPU (default: uniform).")
def generate(model_dir, prompt, max_new_tokens, greedy, temperature, top_p, seed, device, dtype, cpu_weights,
             offload_experts, vram, load_json) -> None:
    """Continue --prompt with the built-in runtime; prints the text (stdout) and prefill/decode tokens/s (stderr)."""
    from .checkpoint.hub import local_model
    from .cli import start_up

    if not offload_experts and (vram or load_json):
        raise UserError(f"{'--vram' if vram else '--load'} only applies with --offload-experts")
    model_dir = local_model(model_dir)
    with start_up(model_dir):
        from .runtime.cli import generate_text, offload_placement, speed_line

    # the KV cache to budget: a prompt has at most one token per UTF-8 byte
    offload = offload_placement(model_dir, offload_experts, vram, load_json, device,
                                context=len(prompt.encode()) + max(max_new_tokens, 0) + 2) if offload_experts else None
    text, result = generate_text(model_dir, prompt, max_new_tokens, cpu_weights=cpu_weights, greedy=greedy,
                                 temperature=temperature, top_p=top_p, seed=seed, device=device, dtype=dtype,
                                 offload=offload)
    click.echo(text)
    click.echo(speed_line(result), err=True)


@click.command("plan")
@click.argument("model_dir")
@click.option("--vram", required=True, help="GPU memory to use, e.g. 6GiB.")
@click.option("--ram", default=None, help="Host memory for the experts left off the GPU, e.g. 32GiB (checked).")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Tokens of KV cache to reserve on the GPU [default: 4096, or the model's context if shorter].")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True,
              help="For a float checkpoint: the quantization to plan for (a quantized one says its own).")
@click.option("--group-size", type=int, default=128, show_default=True, help="-1: per channel (as in quantize).")
@click.option("--load", "load_json", default=None, help="An `eval` JSON: place experts by its measured expert load.")
@click.option("--gpu-gbps", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="GPU memory bandwidth (GB/s).")
@click.option("--cpu-gbps", type=click.FloatRange(min=0, min_open=True), default=40.0, show_default=True,
              help="Host memory bandwidth (GB/s).")
def plan_cmd(model_dir, vram, ram, context, bits, group_size, load_json, gpu_gbps, cpu_gbps) -> None:
    """Place MODEL_DIR's parts on a small GPU (experts by use) and estimate decode tokens/s (config only)."""
    from .checkpoint.hub import local_model
    from .runtime.plan import load_from_eval, model_parts, plan, render

    vram_b = parse_size(vram, "--vram", memory=True)
    ram_b = parse_size(ram, "--ram", memory=True) if ram else None
    if group_size != -1 and (group_size <= 0 or group_size & (group_size - 1)):
        raise UserError(f"--group-size {group_size}: a power of two, or -1 for per channel")
    model_dir = local_model(model_dir, config_only=True)  # a Hub repository: its config.json alone
    parts = model_parts(model_dir, int(bits), None if group_size == -1 else group_size)
    if context is None:
        context = min(4096, parts.max_positions or 4096)
    elif parts.max_positions and context > parts.max_positions:
        raise UserError(f"--context {context} is longer than the model's context (max_position_embeddings "
                        f"{parts.max_positions})")
    load = load_from_eval(load_json, parts) if load_json else None
    click.echo(render(plan(parts, vram_b, context=context, ram_bytes=ram_b, load=load, gpu_gbps=gpu_gbps,
                           cpu_gbps=cpu_gbps), parts, vram_b))
