"""The `moecompress` command line: a thin click layer over the library.

Every user mistake surfaces as one line on stderr and exit code 2 (``UserError``, click's usage
errors); bugs keep their traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import logging
import os
import sys
import threading

import click

from .arch.registry import supported_families
from .errors import UserError
from .units import SEED_MAX, nonempty_path, parse_size


@contextlib.contextmanager
def start_up(*model_dirs):
    """A command's start-up: its imports (inside) and then the configuration and modeling code of each model's
    family (``arch.handle.preload_modeling``), with the collector paused, all frozen at the end under
    ``memory.freeze_start_up`` (set by :func:`entry`). Before any model exists."""
    from .memory import gc_paused

    with gc_paused(freeze=True):
        yield
        from .arch.handle import preload_modeling

        for path in model_dirs:
            if path is not None:
                preload_modeling(path)


def _rank_prefix() -> str:
    """'rank R: ' inside a torchrun launch of several processes (errors name the rank), else ''."""
    import os

    return f"rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _setup_logging(verbose: bool) -> None:
    import os

    level = logging.DEBUG if verbose else logging.INFO
    if _rank_prefix() and os.environ.get("RANK", "0") != "0":  # one voice: rank 0 logs and draws the bars
        level = logging.DEBUG if verbose else logging.WARNING
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=level, format=_rank_prefix() + "%(message)s" if level > logging.INFO else "%(message)s",
                        stream=sys.stderr)
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="moecompress")
def cli(verbose: bool) -> None:
    """Compress Mixture-of-Experts checkpoints: router-aware GPTQ/RTN, streamed layer by layer."""
    _setup_logging(verbose)


@cli.command()
@click.argument("model_dir")
@click.option("--skip-rate", type=click.FloatRange(0, 1), default=None,
              help="Zero-expert models: count active experts/parameters at this share of skipped slots.")
@click.option("--eval", "eval_json", default=None, help="Zero-expert models: take the skip rate measured by "
              "'moecompress eval' (its JSON).")
def inspect(model_dir: str, skip_rate, eval_json) -> None:
    """Describe a checkpoint: family, layers, experts, parameters, sizes, what would be quantized."""
    from .checkpoint.hub import local_model
    from .inspect import describe, measured_skip_rate, render

    if eval_json is not None and skip_rate is not None:
        raise UserError("give --skip-rate or --eval (the skip rate an evaluation measured), not both")
    model_dir = local_model(model_dir)
    if eval_json is not None:
        skip_rate = measured_skip_rate(eval_json, model_dir)
    click.echo(render(describe(model_dir, skip_rate=skip_rate, measured=eval_json is not None)))


@cli.command("make-tiny")
@click.argument("out_dir", callback=nonempty_path)
@click.option("--family", type=click.Choice(supported_families()), default="qwen3_moe", show_default=True)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--fused-experts", is_flag=True, help="Store experts fused 3D (official Qwen3.5/3.6 layout).")
@click.option("--overwrite", is_flag=True)
def make_tiny(out_dir, family, seed, fused_experts, overwrite) -> None:
    """Write a tiny random checkpoint of FAMILY (byte tokenizer included) to try the tools on."""
    from pathlib import Path

    from .checkpoint.writer import atomic_output_dir, check_output_path
    from .tiny import save_tiny

    out = Path(out_dir)
    check_output_path(None, out, overwrite, option="")
    with atomic_output_dir(out, overwrite) as tmp:
        save_tiny(family, tmp, seed=seed, fused_experts=fused_experts)
    click.echo(f"wrote a tiny {family} checkpoint to {out}")


@cli.command()
@click.argument("model_dir")
@click.option("--out", "out", required=True, callback=nonempty_path,
              help="Output folder (must not exist unless --overwrite).")
@click.option("--method", type=click.Choice(["gptq", "rtn", "awq", "awq+gptq"]), default="gptq", show_default=True,
              help="awq: AWQ scales folded, then round to nearest with the clip search; awq+gptq: the scales, then GPTQ.")
@click.option("--bits", type=int, default=4, show_default=True, help="2, 3, 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Power of two; -1 for per-channel.")
@click.option("--sym/--asym", "symmetric", default=True, show_default=True)
@click.option("--act-order", type=click.Choice(["none", "weight", "group"]), default=None,
              help="GPTQ column order (default 'weight': by decreasing Hessian diagonal, groups kept contiguous); "
                   "'group' (GPTQ format only) permutes the groups too; 'none': natural order.")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq", "awq"]), default="compressed-tensors",
              show_default=True)
@click.option("--calib", default="builtin:stdlib", show_default=True,
              help="Text file, folder, .jsonl/.parquet/.arrow, save_to_disk folder, or builtin:stdlib.")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration windows per forward.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Calibration compute dtype (auto: fp32 on CPU, the model's on GPU).")
@click.option("--router-dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default="float32",
              show_default=True, help="Precision of routing during calibration (weights are never changed).")
@click.option("--damp", type=float, default=0.01, show_default=True)
@click.option("--no-clip-search", is_flag=True, help="Plain min/max scales instead of the clipping search.")
@click.option("--no-true-sequential", is_flag=True, help="Calibrate a whole layer at once.")
@click.option("--weight-by-routing/--no-weight-by-routing", default=True, show_default=True,
              help="Weight each token in an expert's Hessian by its squared routing weight.")
@click.option("--refine-rounds", type=click.IntRange(0, 16), default=1, show_default=True,
              help="GPTQ: rounds of least-squares scale refits alternated with GPTQ sweeps (0: plain GPTQ); "
                   "AWQ: any value > 0 alternates scale refits with re-rounding at the refit scales until no "
                   "row improves (at most 8 refits).")
@click.option("--tune-steps", type=click.IntRange(0, 100_000), default=0, show_default=True,
              help="After each layer is solved, tune its codes (each by at most one) and group scales for this "
                   "many signed-gradient steps so that its output approaches the float model's hidden states "
                   "(0: off; 50 gets most of the gain, 200 a little more). Slower: about 0.08 s a step per layer on "
                   "the demo model (2 cores).")
@click.option("--tune-lr", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="First tuning step size (decays linearly to 0). Default 0.4 / --tune-steps, 0.8 / "
                   "--tune-steps at 3 bits or fewer; past 200 steps, that of 200 steps.")
@click.option("--tune-reference", type=click.Path(file_okay=False), default=None,
              help="With --tune-steps: tune toward this float model's layer outputs instead of MODEL_DIR's own, "
                   "e.g. the original a ZEDA model was made from (same architecture, up to zero experts).")
@click.option("--starved-experts", type=click.Choice(["all-tokens", "rtn"]), default="all-tokens", show_default=True)
@click.option("--min-expert-tokens", type=int, default=16, show_default=True)
@click.option("--only-experts", is_flag=True, help="Quantize routed experts only (keep attention, shared experts).")
@click.option("--ignore", multiple=True, metavar="REGEX",
              help="Keep the linears whose 'layers.N.<module>' name matches REGEX in float (repeatable), e.g. "
                   "'layers[.]0[.]self_attn' or 'shared_experts'. Routed experts are always quantized.")
@click.option("--override", "overrides", multiple=True, metavar="REGEX=BITS[/GROUP]",
              help="Another scheme for the linears whose 'layers.N.<module>' name matches REGEX (repeatable, first "
                   "match wins), e.g. 'self_attn|shared_expert=8' or 'layers[.]0[.]=8/64'; 'lm_head=8' with "
                   "--quantize-lm-head. Routed experts always take --bits/--group-size.")
@click.option("--quantize-lm-head", is_flag=True,
              help="Quantize lm_head too (kept in float by default; refused when tied to the embeddings).")
@click.option("--measure-errors/--no-measure-errors", default=True, show_default=True,
              help="RTN: still run the calibration data to record each linear's output error and the "
                   "per-expert token counts (GPTQ always does).")
@click.option("--awq-scales", type=click.Choice(["pow2", "free"]), default="pow2", show_default=True,
              help="pow2: groups read by a router use power-of-two scales (exact fold, routing bit-identical); "
                   "free: continuous scales everywhere (the routing change is measured and recorded).")
@click.option("--awq-grid", type=int, default=20, show_default=True, help="AWQ: alpha grid points in [0, 1).")
@click.option("--awq-search-tokens", type=int, default=8192, show_default=True,
              help="AWQ: residual rows kept per layer for the MoE-block loss of the post-attention scales.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's choice). On a shared machine 1 is often fastest.")
@click.option("--deterministic/--no-deterministic", default=True, show_default=True,
              help="CUDA: deterministic algorithms where torch has them (cuBLAS workspace config, "
                   "torch.use_deterministic_algorithms with warnings for the ops that have none). CPU runs are "
                   "deterministic either way.")
@click.option("--max-shard-size", default="4GiB", show_default=True,
              help="Largest safetensors shard: bytes, or a size like 500MB / 4GiB.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists, and discard a partial run of it.")
@click.option("--resume", is_flag=True,
              help="Continue a killed run of the same settings from its last finished layer (.OUT.partial); "
                   "the result is byte-identical to an uninterrupted run.")
def quantize(model_dir, out, method, bits, group_size, symmetric, act_order, fmt, calib, calib_samples, seq_len,
             seed, batch_size, device, dtype, router_dtype, damp, no_clip_search, no_true_sequential,
             weight_by_routing, refine_rounds, tune_steps, tune_lr, tune_reference, starved_experts, min_expert_tokens, only_experts, ignore, overrides,
             quantize_lm_head,
             measure_errors, awq_scales, awq_grid, awq_search_tokens, threads, deterministic, max_shard_size,
             overwrite, resume) -> None:
    """Quantize MODEL_DIR into --out (routers stay bit-exact in their source dtype).

    On several processes: torchrun --nproc-per-node N -m moecompress quantize ... (gloo on CPU, NCCL with
    cuda:LOCAL_RANK on GPU); the checkpoint is byte-identical to one process's."""
    with start_up():  # torch, transformers: before any model exists
        from .checkpoint.hub import local_model
        from .distributed import Ranks
        from .pipeline import quantize as run
        from .settings import build_config

    if threads:
        import torch

        torch.set_num_threads(threads)

    order = {} if act_order is None else {"act_order": None if act_order == "none" else act_order}
    cfg = build_config(
        "cli", method=method, bits=bits, group_size=group_size, symmetric=symmetric, **order, format=fmt, calib=calib, calib_samples=calib_samples,
        seq_len=seq_len, seed=seed, batch_size=batch_size, device=device, dtype=dtype, router_dtype=router_dtype,
        damp=damp, clip_search=not no_clip_search, true_sequential=not no_true_sequential,
        weight_by_routing=weight_by_routing, refine_rounds=refine_rounds, tune_steps=tune_steps, tune_lr=tune_lr,
        tune_reference=tune_reference,
        starved_experts=starved_experts, min_expert_tokens=min_expert_tokens,
        only_experts=only_experts, ignore=list(ignore), overrides=list(overrides), quantize_lm_head=quantize_lm_head, measure_errors=measure_errors,
        awq_scales=awq_scales, awq_grid=awq_grid, awq_search_tokens=awq_search_tokens,
    )
    # a Hub repository id is fetched now, once the settings (and --out) are known to be valid
    model_dir = local_model(model_dir, out=out, overwrite=overwrite, resume=resume)
    if cfg.tune_reference is not None:
        cfg = cfg.model_copy(update={"tune_reference": local_model(cfg.tune_reference)})
    with start_up(model_dir):  # the family's code, before any model exists
        pass
    if deterministic and device.startswith("cuda"):
        _deterministic_cuda()
    ranks = Ranks.from_env(device)
    try:
        summary = run(model_dir, out, cfg, overwrite=overwrite, command=sys.argv, resume=resume,
                      max_shard_bytes=parse_size(max_shard_size, "--max-shard-size"), ranks=ranks)
    finally:
        ranks.close()
    if not ranks.main:
        return
    n = summary["starved_experts_total"]
    click.echo(f"wrote {out} ({summary['size_bytes'] / 2**20:.1f} MiB, {len(summary['layers'])} layers, "
               f"{n} starved expert{'s' if n != 1 else ''} handled by '{cfg.starved_experts}') "
               f"in {summary['timings_s']['total']:.1f}s")


def _deterministic_cuda() -> None:
    """Same bytes from the same inputs on CUDA where torch allows: cuBLAS needs a fixed workspace (set before
    the first cuBLAS call), and ops with only atomic-add kernels warn instead of failing."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


@cli.command("run")
@click.argument("recipe")
@click.option("--out", default=None, callback=nonempty_path,
              help="Run folder (default: the recipe's output_dir, relative to the current directory).")
@click.option("--force", is_flag=True, help="Rebuild, re-evaluate and re-benchmark every variant.")
@click.option("--cache", "cache_dir", default=None, help="Cache folder for built-in models (default $MOECOMPRESS_CACHE).")
def run_cmd(recipe, out, force, cache_dir) -> None:
    """Build, evaluate and report every variant of a YAML RECIPE (work already done is skipped)."""
    import torch

    from .distributed import Ranks
    from .report import summary_text, write_report
    from .run.runner import run_recipe

    # torchrun -m moecompress run RECIPE: quantize and eval steps split over the ranks (NCCL when GPUs exist)
    ranks = Ranks.from_env("cuda" if torch.cuda.is_available() else "cpu")
    try:
        run_dir = run_recipe(recipe, out=out, force=force, cache_dir=cache_dir, report=False, ranks=ranks)
    finally:
        ranks.close()
    if ranks.main:
        click.echo(summary_text(write_report(run_dir)))


@cli.command("report")
@click.argument("run_dir")
@click.option("--open", "open_", is_flag=True, help="Open report.html in a browser (nothing happens without a display).")
def report_cmd(run_dir, open_) -> None:
    """Write report.json/.md/.html and plots/ for RUN_DIR (a `moecompress run` folder)."""
    from .report import open_in_browser, summary_text, write_report

    data = write_report(run_dir)
    click.echo(summary_text(data))
    if open_ and "html" in data["files"] and not open_in_browser(data["files"]["html"]):
        click.echo("(no browser available: open the file above yourself)")


@cli.command("demo")
@click.option("--quick", is_flag=True, help="A less-trained model, fewer variants and windows (~2 CPU minutes).")
@click.option("--out", default=None, callback=nonempty_path,
              help="Run folder (default: ./moecompress-demo, or ./moecompress-demo-quick).")
@click.option("--cache", "cache_dir", default=None, help="Where the demo model is cached (default $MOECOMPRESS_CACHE "
                                                          "or ~/.cache/moecompress).")
@click.option("--force", is_flag=True, help="Redo every variant even when up to date.")
def demo_cmd(quick, out, cache_dir, force) -> None:
    """Quantize a small trained MoE with RTN and GPTQ, evaluate, and report (the model is built once)."""
    from .report import summary_text
    from .run.demo import run_demo

    data = run_demo(quick=quick, out=out, cache_dir=cache_dir, force=force)
    t = data["timings_s"]
    click.echo(summary_text(data))
    click.echo(f"demo took {t['total']:.0f}s (model {t['model']:.0f}s, quantize+evaluate+report {t['run']:.0f}s)")


@cli.command("eval")
@click.argument("model_dir")
@click.option("--reference", required=True, help="The original checkpoint the model is compared with.")
@click.option("--data", multiple=True, help="Held-out text (repeatable; same forms as --calib). "
              "Default: builtin:heldout-code and builtin:heldout-prose.")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Windows per data source.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=1234, show_default=True)
@click.option("--low-memory", is_flag=True, help="Stream one decoder layer of each model at a time.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype (auto: fp32 on CPU, the reference's dtype on GPU).")
@click.option("--tasks", default=None, help="lm-eval task names, comma-separated (needs `pip install lm-eval`).")
@click.option("--tasks-path", default=None, help="Folder of extra lm-eval task YAMLs.")
@click.option("--tasks-limit", type=click.IntRange(min=1), default=None, help="At most this many examples per task.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--reference-cache", default=None, metavar="DIR",
              help="Store the reference's outputs in DIR and reuse them when the same reference is evaluated "
              "again on the same data and settings (the reference is then not run; numbers are identical).")
@click.option("--reference-cache-max-gib", type=click.FloatRange(min=0, max=1e6), default=2.0, show_default=True,
              help="Do not write a cache entry larger than this; the oldest entries of DIR are removed to stay "
              "under it.")
@click.option("--json", "json_out", required=True, callback=nonempty_path, help="Where to write the evaluation (JSON).")
def eval_cmd(model_dir, reference, data, samples, seq_len, batch_size, seed, low_memory, device, dtype, tasks,
             tasks_path, tasks_limit, threads, reference_cache, reference_cache_max_gib, json_out) -> None:
    """Compare MODEL_DIR with --reference: perplexity, KL, top-1 and routing agreement, expert load, size."""
    unused = [o for o, v in (("--tasks-path", tasks_path), ("--tasks-limit", tasks_limit)) if v is not None]
    if unused and not tasks:
        raise UserError(f"{' and '.join(unused)} only apply with --tasks")
    from .checkpoint.hub import local_model

    model_dir, reference = local_model(model_dir), local_model(reference)
    with start_up(model_dir, reference):
        from .evals.evaluate import evaluate
        from .evals.output import check_json_path, refuse_inside, summary, write_json_atomic

    if threads:
        import torch

        torch.set_num_threads(threads)
    from .distributed import Ranks

    check_json_path(json_out, (model_dir, reference))
    if reference_cache:
        refuse_inside(reference_cache, (model_dir, reference), "--reference-cache")
    ranks = Ranks.from_env(device)  # torchrun -m moecompress eval ...: the windows split over the ranks
    try:
        result = evaluate(model_dir, reference, data=list(data) or None, samples=samples, seq_len=seq_len,
                          batch_size=batch_size, seed=seed, low_memory=low_memory, device=ranks.device(device),
                          tasks=tasks, dtype=dtype, tasks_path=tasks_path, tasks_limit=tasks_limit,
                          reference_cache=reference_cache,
                          reference_cache_max_bytes=int(reference_cache_max_gib * 1024 ** 3), ranks=ranks)
    finally:
        ranks.close()
    if not ranks.main:
        return
    write_json_atomic(json_out, result)
    click.echo(summary(result))
    click.echo(f"wrote {json_out}")


from .runtime_cli import generate, plan_cmd  # noqa: E402
from .zeda.cli import zeda  # noqa: E402
from .zero.cli import zero_experts  # noqa: E402

for _command in (generate, plan_cmd, zero_experts, zeda):
    cli.add_command(_command)


_ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def main(argv=None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {_rank_prefix()}{e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # a bare group: its help, not an error
        click.echo(e.format_message())
        return 0
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS and not _rank_prefix():
            # where the user pointed us cannot take what we write (or read): theirs to fix, not a bug to trace
            click.echo(f"error: {e.filename or 'a file'}: {(e.strerror or str(e)).lower()}" + (
                " (choose a place you can write to)" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""),
                err=True)
            return 2
        if not _rank_prefix():
            raise
        # a rank that fails says so in one line; torchrun then stops the others (which name what they saw)
        click.echo(f"error: {_rank_prefix()}{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   err=True)
        return 1
    return 0


def entry() -> None:
    from .memory import freeze_start_up

    freeze_start_up()  # this process ends in _exit: start-up objects may leave the collector's view
    try:
        code = main()
    except BaseException:  # a bug's traceback (or a SystemExit from below): Python's normal exit follows
        gc.unfreeze()
        raise
    _exit(code)


def _exit(code: int) -> None:
    """End the process without Python's module teardown, which spends ~0.8 s (of a 10 s quantize)
    garbage-collecting what torch, transformers and triton built. Every output is complete and renamed
    by now; what the teardown would still do is done here: logging handlers, atexit callbacks (tqdm,
    torch), the standard streams. Where another non-daemon thread still runs, the normal exit joins it."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        gc.unfreeze()  # the teardown then collects what start-up froze (else extensions report leaked objects)
        sys.exit(code)
    logging.shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
