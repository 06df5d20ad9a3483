"""The numbers of a report: one row per variant from a run folder's evaluations, the Pareto fronts,
the best variant of each size, and the RTN-versus-GPTQ verdicts. Pure functions, no plotting.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from ..errors import UserError

log = logging.getLogger("moecompress")

REFERENCE = "reference"
SIZE_CLASS_TOLERANCE = 0.02  # sizes within 2% of each other are "the same size"


def pareto_front(points: Sequence[tuple[float | None, float | None]],
                 maximize: tuple[bool, bool] = (False, False)) -> list[int]:
    """Indices of the points no other point dominates (at least as good on both axes, better on one).

    ``maximize[k]`` says whether larger is better on axis k (default: smaller is better on both).
    Points with a missing coordinate are never on the front; equal points are all kept.
    """
    sign = [-1.0 if m else 1.0 for m in maximize]
    pts = [(i, (sign[0] * p[0], sign[1] * p[1])) for i, p in enumerate(points) if p[0] is not None and p[1] is not None]
    front = []
    for i, (x, y) in pts:
        dominated = any(ox <= x and oy <= y and (ox < x or oy < y) for j, (ox, oy) in pts if j != i)
        if not dominated:
            front.append(i)
    return front


def size_classes(sizes: Sequence[float], tolerance: float = SIZE_CLASS_TOLERANCE) -> list[int]:
    """A class id per size: sizes within ``tolerance`` (relative) of their class's smallest share it."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    cls, out, start = -1, [0] * len(sizes), None
    for i in order:
        if start is None or sizes[i] > start * (1 + tolerance):
            cls, start = cls + 1, sizes[i]
        out[i] = cls
    return out


def _read(path: Path) -> dict:
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(got, dict):
        raise UserError(f"{path} holds a JSON {type(got).__name__}, not the object moecompress writes")
    return got


def _is_number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v)  # (NaN != NaN)


def _evaluation(path: Path) -> dict | None:
    """``path`` read as an evaluation ``moecompress eval`` wrote; None (and a warning) for a JSON file that is
    not one (a moecompress.json copied in by hand); one-line UserError for an evaluation with bad values."""
    ev = _read(path)
    if not {"kl", "ppl", "data"} <= ev.keys():
        log.warning("report: %s is not an evaluation (no kl, ppl and data): left out", path)
        return None
    for key in ("ppl", "ppl_reference", "data", "routing", "skip_rate", "active_experts"):
        if ev.get(key) is not None and not isinstance(ev[key], dict):
            raise UserError(f"{path}: '{key}' is a JSON {type(ev[key]).__name__}, not the object eval writes")
    bad = [f"{k} = {v!r}" for k, v in [("kl", ev.get("kl")), ("top1_agreement", ev.get("top1_agreement")),
                                        ("size_bytes", ev.get("size_bytes"))]
           + [(f"ppl.{d}", v) for d, v in (ev.get("ppl") or {}).items()]
           + [(f"routing.{k}", ev["routing"].get(k)) for k in ("topk_exact", "jaccard", "router_kl")
              if ev.get("routing")] if not _is_number(v)]
    if bad:
        raise UserError(f"{path}: not a number: {', '.join(bad[:3])}")
    return ev


def load_run(run_dir: str | Path) -> tuple[dict, dict[str, dict], dict[str, dict], list[str]]:
    """``(run_info, evals, benches, notes)`` of a run folder, in report order (reference first, then the
    recipe's order). Without ``run.json`` (evaluations copied by hand) every ``eval/*.json`` that is an
    evaluation is used. In a ``moecompress run`` folder a result that measured another checkpoint than the one
    there now (a run killed between a rebuild and its evaluation), benchmarks of a recipe without a ``bench``
    section, and variants without an evaluation are left out, each said in ``notes``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}")
    info = _read(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    if info.get("variants") is not None:
        variants = info["variants"]
        if not isinstance(variants, list) or not all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                     for v in variants):
            raise UserError(f"{run_dir / 'run.json'}: 'variants' is not the list of named variants 'run' writes")
        names = [REFERENCE] + [v["name"] for v in variants]
    else:
        names = sorted((p.stem for p in (run_dir / "eval").glob("*.json")), key=lambda n: (n != REFERENCE, n))
    evals = {n: _evaluation(run_dir / "eval" / f"{n}.json") for n in names
             if (run_dir / "eval" / f"{n}.json").is_file()}
    evals = {n: ev for n, ev in evals.items() if ev is not None}
    if not evals:
        raise UserError(f"{run_dir} has no evaluations (eval/*.json): run `moecompress run` first")
    benches = {n: _read(run_dir / "bench" / f"{n}.json") for n in names if (run_dir / "bench" / f"{n}.json").is_file()}
    notes: list[str] = []
    if info.get("variants") is not None:
        evals, benches, notes = _current(run_dir, info, names, evals, benches)
        if not evals:
            raise UserError(f"{run_dir} has no evaluation of its checkpoints as they are now: run `moecompress run` "
                            "again")
    return info, evals, benches, notes


def _checkpoint(run_dir: Path, info: dict, name: str) -> Path | None:
    """Where run.json says variant ``name``'s checkpoint is (the reference: the source model); None where it
    does not say (a run of an older build)."""
    if name == REFERENCE:
        return Path(info["model_path"]) if info.get("model_path") else None
    where = next(v for v in info["variants"] if v["name"] == name).get("checkpoint")
    return run_dir / where if isinstance(where, str) else None  # (relative to the run folder)


def _current(run_dir: Path, info: dict, names: list[str], evals: dict, benches: dict):
    """The results that measured the checkpoints as they are now (their ``run_stamp``), and one note per
    result left out."""
    from ..run.stamps import folder_stamp

    notes, stamps = [], {}

    def now(name):
        if name not in stamps:
            d = _checkpoint(run_dir, info, name)
            stamps[name] = folder_stamp(d) if d is not None and d.is_dir() else None
        return stamps[name]

    def fresh(kind, results):
        kept, stale = {}, []
        for name, res in results.items():
            measured = (res.get("run_stamp") or {}).get("model_stamp")
            if measured is not None and now(name) is not None and measured != now(name):
                stale.append(name)
            else:
                kept[name] = res
        if stale:
            notes.append(f"{kind} of {', '.join(stale)} measured an earlier build of the checkpoint (the run stopped "
                         "before measuring the new one): left out; `moecompress run` measures them again")
        return kept

    evals = fresh("the evaluations", evals)
    recipe = info.get("recipe") or {}
    if benches and "bench" in recipe and recipe["bench"] is None:  # (a hand-written run.json may not say)
        notes.append(f"bench/ holds benchmarks ({', '.join(benches)}) but the recipe has no bench section now: "
                     "left out")
        benches = {}
    benches = fresh("the benchmarks", benches)
    missing = [n for n in names if n not in evals]
    if missing:
        notes.append(f"no current evaluation of {', '.join(missing)} (a partial run?): not in the report; "
                     "`moecompress run` evaluates them")
    return evals, benches, notes


def _config(name: str, info: dict, ev: dict) -> dict:
    for v in info.get("variants") or []:
        if v["name"] == name:
            return v.get("config") or {}
    q = ev.get("quantization") or {}
    return q.get("recipe") if isinstance(q.get("recipe"), dict) else q


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 100.0 * (a / b - 1.0)


def build_rows(info: dict, evals: dict[str, dict], benches: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """One row of key numbers per variant, and the dataset names (in evaluation order)."""
    datasets: list[str] = []
    for ev in evals.values():
        for d in list((ev.get("data") or {}).keys()) + list((ev.get("ppl") or {}).keys()):
            if d not in datasets:
                datasets.append(d)
    ref_ppl = (evals.get(REFERENCE) or {}).get("ppl") or {}
    rows = []
    for name, ev in evals.items():
        is_ref = name == REFERENCE
        cfg = {} if is_ref else _config(name, info, ev)
        base = {**ref_ppl, **(ev.get("ppl_reference") or {})}
        ppl = ev.get("ppl") or {}
        routing = ev.get("routing") or {}
        bench = benches.get(name) or {}
        size = ev.get("size_bytes")
        skip = (ev.get("skip_rate") or {}).get("model_overall")
        active = ev.get("active_experts") or {}
        method = "source" if is_ref else (f"skip {cfg['rule']}" if "rule" in cfg and "target" in cfg else cfg.get("method"))
        if cfg.get("tune_steps") and method:  # block-output tuning after the solver: its own method
            method = f"{method}+tune{cfg['tune_steps']}"
        if cfg.get("source") == "zeda" and method:
            method = f"zeda+{method}"
        rows.append({
            "name": name, "is_reference": is_ref,
            "method": method,
            "bits": None if is_ref else cfg.get("bits"),
            "group_size": None if is_ref else cfg.get("group_size"),
            "act_order": None if is_ref else cfg.get("act_order"),
            "overrides": [] if is_ref else list(cfg.get("overrides") or []),  # per-module schemes (--override)
            "settings": {} if is_ref else dict(cfg),
            "calib_seed": None if is_ref or (cfg.get("method") == "rtn" and not cfg.get("tune_steps")) else cfg.get("seed"),
            "bits_per_weight": ev.get("bits_per_weight"),
            "size_bytes": size, "size_mb": None if size is None else size / 1e6,
            "ppl": {d: ppl.get(d) for d in datasets},
            "ppl_delta_pct": {d: 0.0 if is_ref and d in ppl else _pct(ppl.get(d), base.get(d)) for d in datasets},
            "kl": ev.get("kl"), "top1": ev.get("top1_agreement"),
            "topk_exact": routing.get("topk_exact"), "jaccard": routing.get("jaccard"),
            "router_kl": routing.get("router_kl"),
            "prefill_tokens_per_s": bench.get("prefill_tokens_per_s"),
            "decode_tokens_per_s": bench.get("decode_tokens_per_s"),
            # zero experts: share of slots skipped, real experts per token, routed-expert FLOPs vs the reference
            "skip_rate": skip if skip is not None else (0.0 if active else None),
            "active_experts": active.get("model_overall"),
            "expert_flops": None if not active else 1.0 - active.get("expert_flops_saved_overall", 0.0),
        })
    _mark(rows)
    return rows, datasets


def _mark(rows: list[dict]) -> None:
    """Pareto fronts (size vs KL; decode speed vs KL) and the best (lowest KL) of each shared size."""
    known = [i for i, r in enumerate(rows) if r["size_bytes"] is not None]
    classes = dict(zip(known, size_classes([rows[i]["size_bytes"] for i in known])))
    # by size class, as the best-of-size mark: a file a few header bytes smaller is not "smaller"
    front = set(pareto_front([(classes.get(i), r["kl"]) for i, r in enumerate(rows)]))
    speed = set(pareto_front([(r["decode_tokens_per_s"], r["kl"]) for r in rows], maximize=(True, False)))
    has_speed = any(r["decode_tokens_per_s"] is not None for r in rows)
    for i, r in enumerate(rows):
        r["pareto_size"] = i in front
        r["pareto_speed"] = (i in speed) if has_speed else None
        r["size_class"] = classes.get(i)
        r["best_at_size"] = False
    for c in set(classes.values()):
        members = [i for i, k in classes.items() if k == c and rows[i]["kl"] is not None]
        if len(members) >= 2:
            best = min(members, key=lambda i: (rows[i]["kl"], _first_ppl(rows[i])))
            rows[best]["best_at_size"] = True


def _first_ppl(row: dict) -> float:
    vals = [v for v in row["ppl"].values() if v is not None]
    return vals[0] if vals else float("inf")


def _fmt_list(vals, fmt) -> str:
    return " / ".join(fmt.format(v) for v in vals)


def verdicts(rows: list[dict], datasets: list[str], sensitivity_pct: float = 3.0) -> list[dict]:
    """For each (bits, group size) quantized by both RTN and GPTQ, GPTQ at several calibration seeds:
    does RTN visibly hurt (perplexity up by >= ``sensitivity_pct`` on every dataset: the model is
    sensitive enough for the comparison to mean something), and does GPTQ beat RTN by more than the
    spread between its seeds (``RTN - worst GPTQ > max GPTQ - min GPTQ`` on every dataset)?
    With a single GPTQ run there is no spread (``gptq_beats_rtn_beyond_seed_spread`` None): the line says which
    method did better where RTN's cost is large enough to rank them, and compares the mean KL (more sensitive
    than perplexity) either way."""
    ref = next((r for r in rows if r["is_reference"]), None)
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r["is_reference"] or r["method"] not in ("rtn", "gptq") or r.get("overrides"):
            continue  # a variant with other schemes for some linears is not one of the group's runs
        groups.setdefault((r["bits"], r["group_size"]), {"rtn": [], "gptq": []})[r["method"]].append(r)
    out = []
    for (bits, gs), g in [(k, sub) for k, both in groups.items() for sub in _by_settings(both)]:
        if not g["rtn"] or not g["gptq"]:
            continue
        ds = [d for d in datasets if all(r["ppl"].get(d) is not None for r in g["rtn"] + g["gptq"])
              and ref is not None and ref["ppl"].get(d)]
        if not ds:
            continue
        rtn = {d: max(r["ppl"][d] for r in g["rtn"]) for d in ds}
        gptq = {d: [r["ppl"][d] for r in g["gptq"]] for d in ds}
        rtn_pct = {d: 100.0 * (rtn[d] / ref["ppl"][d] - 1) for d in ds}
        gptq_pct = {d: 100.0 * (sum(gptq[d]) / len(gptq[d]) / ref["ppl"][d] - 1) for d in ds}
        spread = {d: max(gptq[d]) - min(gptq[d]) for d in ds}
        margin = {d: rtn[d] - max(gptq[d]) for d in ds}
        # judged on the value as printed (2 decimals): "+3.0% (>= 3%: NO)" for a true +2.96% read as a contradiction
        sensitive = all(round(rtn_pct[d], 2) >= sensitivity_pct for d in ds)
        beats = all(margin[d] > spread[d] for d in ds)
        better = all(margin[d] > 0 for d in ds)
        label = f"W{bits} g{gs if gs else 'channel'}" + (f" [{g['differs']}]" if g.get("differs") else "")
        seeds = [r["calib_seed"] for r in g["gptq"]]
        n = len(g["gptq"])
        names = ", ".join(d.removeprefix("builtin:") for d in ds)
        if n >= 2:
            line = (f"{label} ({names}): RTN perplexity {_fmt_list(rtn_pct.values(), '{:+.2f}%')} "
                    f"(>= {sensitivity_pct:g}%: {'yes' if sensitive else 'NO'}); "
                    f"GPTQ, calibration seeds {', '.join(map(str, seeds))}: {_fmt_list(gptq_pct.values(), '{:+.1f}%')}; "
                    f"RTN - worst GPTQ {_fmt_list(margin.values(), '{:.2f}')} ppl vs seed spread "
                    f"{_fmt_list(spread.values(), '{:.2f}')}: GPTQ beats RTN by more than the seed spread: "
                    f"{'yes' if beats else 'NO'}{_kl_clause(g)}")
        else:  # one calibration seed: no spread to compare with
            beats = None
            where = "every set" if all(round(rtn_pct[d], 2) < sensitivity_pct for d in ds) else "a set"
            verdict = (f"GPTQ better than RTN: {'yes' if better else 'NO'}" if sensitive else
                       f"RTN costs under {sensitivity_pct:g}% (on {where}), too little for perplexity to rank the "
                       "methods")
            # RTN as precise as the sensitivity is judged (+2.96% must not print as +3.0% beside "under 3%")
            line = (f"{label} ({names}): RTN perplexity {_fmt_list(rtn_pct.values(), '{:+.2f}%')}, GPTQ "
                    f"{_fmt_list(gptq_pct.values(), '{:+.1f}%')}: {verdict}{_kl_clause(g)} "
                    "(one calibration seed: no seed spread measured)")
        out.append({"label": label, "bits": bits, "group_size": gs, "datasets": ds, "rtn_kl": _kl(g["rtn"]),
                    "gptq_kl": _kl(g["gptq"]),
                    "rtn_ppl": rtn, "gptq_ppl": gptq, "rtn_increase_pct": rtn_pct, "gptq_increase_pct": gptq_pct,
                    "gptq_seed_spread": spread, "rtn_minus_worst_gptq": margin, "gptq_runs": n,
                    "sensitive": sensitive, "gptq_beats_rtn_beyond_seed_spread": beats,
                    "gptq_better": better, "gptq_lower_kl": _lower(g), "line": line})
    return out


# settings that do not change what a GPTQ run computes, beyond float rounding (the seed is what a group varies)
_NOT_A_METHOD = {"seed", "format", "device", "batch_size", "expert_chunk", "reduce_chunks", "measure_errors", "name"}


def _by_settings(g: dict[str, list[dict]]) -> list[dict]:
    """The GPTQ runs of one (bits, group size) split by their settings but the seed: only runs that differ by
    their calibration seed alone measure a seed spread. Several sets: each its own verdict, labelled by what
    sets it apart (``differs``)."""
    sets: dict[str, list[dict]] = {}
    for r in g["gptq"]:
        key = json.dumps({k: v for k, v in (r.get("settings") or {}).items() if k not in _NOT_A_METHOD},
                         sort_keys=True, default=str)
        sets.setdefault(key, []).append(r)
    if len(sets) <= 1:
        return [g]
    keyed = [json.loads(k) for k in sets]
    varies = sorted({k for d in keyed for k in d if any(o.get(k) != d.get(k) for o in keyed)})
    return [{"rtn": g["rtn"], "gptq": runs, "differs": ", ".join(f"{k} {d.get(k)}" for k in varies)}
            for d, runs in zip(keyed, sets.values())]


def _kl(runs: list[dict]) -> float | None:
    """The runs' mean KL to the reference (their worst, over several seeds); None where one lacks it."""
    kls = [r.get("kl") for r in runs]
    return None if not kls or any(k is None for k in kls) else max(kls)


def verdict_holds(v: dict) -> bool:
    """GPTQ wins on what the experiment can judge: by more than its seed spread (several seeds), on perplexity
    where RTN's cost is large enough to rank the methods, and on mean KL. An insensitive model alone is a
    caveat (said in the line), not a loss."""
    return (v.get("gptq_lower_kl") is not False and v["gptq_beats_rtn_beyond_seed_spread"] is not False
            and not (v["sensitive"] and v.get("gptq_better") is False))


def _lower(g: dict[str, list[dict]]) -> bool | None:
    """GPTQ's (worst seed's) mean KL below RTN's; None where either lacks it."""
    rtn, gptq = _kl(g["rtn"]), _kl(g["gptq"])
    return None if rtn is None or gptq is None else gptq < rtn


def _kl_clause(g: dict[str, list[dict]]) -> str:
    lower = _lower(g)
    if lower is None:
        return ""
    return f"; mean KL RTN {_kl(g['rtn']):.4g}, GPTQ {_kl(g['gptq']):.4g}: GPTQ lower: {'yes' if lower else 'NO'}"


def text_mismatches(evals: dict[str, dict]) -> list[str]:
    """One line per dataset whose evaluations read different text (evaluations copied in by hand, or made
    before ``moecompress run`` re-evaluated on edited text): their numbers do not compare."""
    out = []
    names = list(dict.fromkeys(d for ev in evals.values() for d in (ev.get("data") or {})))
    for d in names:
        by_sha: dict[str, list[str]] = {}
        for variant, ev in evals.items():
            sha = ((ev.get("data") or {}).get(d) or {}).get("text_sha256")
            if sha:
                by_sha.setdefault(sha, []).append(variant)
        if len(by_sha) > 1:
            groups = "; ".join(f"{', '.join(v)} on {sha[:12]}" for sha, v in by_sha.items())
            out.append(f"{d}: the evaluations read different text ({groups}); their numbers do not compare: "
                       "evaluate them again on the same data")
    return out


def setting_mismatches(evals: dict[str, dict]) -> list[str]:
    """A line when the evaluations compared against different reference models or used different windows
    (samples, length, seed): the report's rows then do not share a baseline."""
    out = []
    for what, key in (("reference models", lambda ev: str(ev.get("reference"))),
                      ("window settings", lambda ev: json.dumps({k: (ev.get("settings") or {}).get(k)
                                                                  for k in ("samples", "seq_len", "seed")}))):
        groups: dict[str, list[str]] = {}
        for name, ev in evals.items():
            groups.setdefault(key(ev), []).append(name)
        if len(groups) > 1:
            out.append(f"the evaluations used different {what} (" + "; ".join(
                f"{', '.join(v)}: {k}" for k, v in groups.items()) + "): their rows do not compare")
    return out


def report_data(run_dir: str | Path, loaded: tuple | None = None) -> dict:
    """Everything ``report.json`` holds (``loaded``: what :func:`load_run` read of the folder, if it has)."""
    info, evals, benches, notes = loaded or load_run(run_dir)
    settings = (info.get("recipe") or {}).get("report") or {}
    rows, datasets = build_rows(info, evals, benches)
    ref = evals.get(REFERENCE) or next(iter(evals.values()))
    return {
        "title": settings.get("title") or f"moecompress report: {Path(run_dir).resolve().name}",
        "run_dir": str(Path(run_dir).resolve()),
        "model": info.get("model_path") or ref.get("reference"),
        "family": ref.get("family"),
        "datasets": datasets,
        "data": ref.get("data") or {},
        "eval_settings": ref.get("settings") or {},
        "calibration": (info.get("recipe") or {}).get("calibration"),
        "variants": rows,
        "verdicts": verdicts(rows, datasets, settings.get("sensitivity_pct", 3.0)),
        "has_speed": any(r["decode_tokens_per_s"] is not None for r in rows),
        "has_skipping": any(r["skip_rate"] for r in rows),
        "bench": next(({k: b.get(k) for k in ("device", "dtype", "batch")} for b in benches.values()), None),
        "decisions": info.get("decisions") or [],
        "warnings": notes + setting_mismatches(evals) + text_mismatches(evals),
        "run_seconds": info.get("seconds"),
    }
