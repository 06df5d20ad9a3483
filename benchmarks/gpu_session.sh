#!/usr/bin/env bash
# The GPU figures in one command (see benchmarks/GPU.md). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh fetch-wheels   # HERE, on the dev machine, before the device call:
#                                                  # pydantic (not in the device image) as cp312 wheels in .whl/
#   bash benchmarks/gpu_session.sh                 # ON THE DEVICE: setup + zero + layer + e2e + tests, < 10 min
#   bash benchmarks/gpu_session.sh e2e bench       # only some steps (setup always runs)
#
# Steps (each runs under `timeout`, its exit code goes to $OUT/summary.txt and the run goes on):
#   setup  nvidia-smi, versions, disk; pydantic from .whl/ if missing; the package (pip -e, no deps, no
#          build isolation; else a sitecustomize shim on PYTHONPATH); which of our imports are missing
#   zero   the kernel bench at Qwen3-30B-A3B shapes, bf16/int4, 0/25/50/75% of slots on zero experts,
#          T = 1..64, CUDA graphs                               -> zero_bench.json
#   align  the zero-slot bench with MOECOMPRESS_TRITON_ALIGN=1 (the CUDA default since 2026-12-04) -> align_bench.json
#   layer  benchmarks/gpu_layer_time.py: GPTQ/RTN quantize time per Qwen3-30B-A3B layer -> layer.json
#   tests  TRITON_INTERPRET=0 pytest -x tests/test_kernels_*.py tests/test_runtime_*.py tests/test_pipeline_cuda.py -> tests.log
#   bench  python -m moecompress.kernels.bench (default shapes)  -> bench.log, kernels_bench.json
#   e2e    benchmarks/e2e_decode.py --layers $E2E_LAYERS (4)     -> e2e.log, e2e.json
#   zeda   `moecompress zeda --device cuda` (bf16 autocast, transformers' experts on the GPU, zero slots) on
#          $ZEDA_MODEL (default: a tiny random qwen3_moe built here; carry the demo model for real figures),
#          then `moecompress eval` of its output on cuda            -> zeda.log, zeda_eval.json
#   offload  expert offload on the GPU: its tests (tests/test_runtime_cpu_packed.py -k offload), then
#          benchmarks/offload_decode.py: decode tok/s with 128/96/64/32/0 experts per layer on the GPU (the rest
#          on the CPU) beside `moecompress plan`'s estimate, Qwen3-30B-A3B shapes, 2 layers -> offload.json
#   tune   benchmarks/tune_memory.py --device cuda: a whole Qwen3-30B-A3B MoE block (128 experts) tuned in bf16,
#          peak GPU memory and step time of the tuning's own backward against torch's autograd (its twin)
# Timeouts: 520 s shared by the selected steps in proportion to WEIGHT below (one alone: 520 s);
# override with TESTS_TIMEOUT / BENCH_TIMEOUT / E2E_TIMEOUT (seconds) or BUDGET.
# Everything lands in $OUT: summary.txt, setup.log, steps.log (every step's output) and the JSON files (the
# device tool returns 8 files at most).

set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ------------------------------------------------------------------ fetch-wheels (dev machine only)
if [ "${1:-}" = "fetch-wheels" ]; then
    # the versions of the dev venv (pydantic pins pydantic-core exactly); the device runs CPython 3.12
    VPY=${VPY:-/work/venv/bin/python}
    pins=$("$VPY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
               ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
EOF
    ) || { echo "cannot read the versions from $VPY"; exit 1; }
    mkdir -p .whl
    echo "downloading into .whl/: $pins"
    # shellcheck disable=SC2086
    "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins || exit 1
    ls -la .whl
    echo "now: run tool with carry [\".whl\"] and command: bash benchmarks/gpu_session.sh"
    exit 0
fi

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(zero layer e2e tests)
for s in "${steps[@]}"; do
    case $s in tests|bench|e2e|zero|align|layer|sweep|offload|zeda|tune) ;; *) echo "unknown step '$s' (zero, align, layer, e2e, tests, bench, sweep, offload, zeda, tune; fetch-wheels on the dev machine)"; exit 2;; esac
done

OUT=${OUT:-/tmp/moecompress_gpu_out}  # the device tool sets OUT
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
SETUP=$OUT/setup.log
: >"$SUMMARY"
# timeouts: a 520 s budget (BUDGET) shared by the selected steps in proportion 170 : 120 : 250, so that the
# whole call (setup ~30 s, 15 s kill grace per step) stays under the device tool's 600 s;
# TESTS_TIMEOUT/BENCH_TIMEOUT/E2E_TIMEOUT override
BUDGET=${BUDGET:-520}
declare -A WEIGHT=([tests]=100 [bench]=120 [e2e]=160 [zero]=100 [align]=80 [layer]=160 [sweep]=100 [offload]=160 [zeda]=120 [tune]=90)
total_w=0
for s in "${steps[@]}"; do total_w=$((total_w + WEIGHT[$s])); done
limit() {  # step -> seconds
    local var=${1^^}_TIMEOUT
    if [ -n "${!var:-}" ]; then echo "${!var}"; else echo $((BUDGET * WEIGHT[$1] / total_w)); fi
}

note() { echo "$*" | tee -a "$SUMMARY"; }

run_step() {  # name timeout command...
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    note "=== $name (timeout ${secs}s): $*"
    echo "=== $name: $*" >>"$OUT/steps.log"
    timeout -k 15 "$secs" "$@" 2>&1 | tee -a "$OUT/steps.log"  # one log for all steps: the tool returns 8 files
    local rc=${PIPESTATUS[0]}
    local why=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (TIMED OUT)"
    note "$name: rc=$rc$why in $((SECONDS - t0))s"
}

# ------------------------------------------------------------------ setup
{
    echo "=== $(date -u +%FT%TZ) host $(hostname) repo $REPO"
    nvidia-smi || echo "nvidia-smi failed"
    echo "--- python: $(command -v "$PY")"
    "$PY" - <<'EOF' || echo "python version check failed"
import platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "safetensors", "tokenizers", "pydantic", "pytest", "click"):
    try:
        mod = __import__(name)
        print(f"{name:13s} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{name:13s} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda available:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
    nproc; free -g | head -2; df -h /tmp "$REPO" | uniq
} >"$SETUP" 2>&1
cat "$SETUP"

# pydantic (moecompress.settings, hence quantize and most runtime tests) is not in the device image:
# install the carried wheels from .whl/ (see fetch-wheels) into /tmp/site
if ! "$PY" -c "import pydantic" >/dev/null 2>&1; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >>"$SETUP" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        note "setup: pydantic from .whl/ into /tmp/site: $("$PY" -c 'import pydantic; print(pydantic.VERSION)' 2>&1 | tail -1)"
    else
        note "setup: pydantic is MISSING and no .whl/ was carried: quantize (the e2e int4 model) and every test" \
             "importing moecompress.pipeline will fail. Fix: 'bash benchmarks/gpu_session.sh fetch-wheels' on the" \
             "dev machine, then carry [\".whl\"]."
    fi
fi

# the package: moecompress.kernels lives in kernels/ (package-dir mapping), so PYTHONPATH=. is not enough
# (find_spec imports moecompress and moecompress.kernels only: no torch, so a missing dependency is not
# mistaken for a packaging problem)
packaged() { (cd /tmp && "$PY" -c "import importlib.util as u; assert u.find_spec('moecompress.kernels.bench')") >/dev/null 2>&1; }
if ! packaged; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$SETUP" 2>&1 \
        || echo "pip -e failed" >>"$SETUP"
fi
if ! packaged; then
    # fallback: a sitecustomize that imports the package from the repo and adds the repo to its __path__,
    # so that moecompress.kernels/.evals/.recipes resolve to kernels/, evals/, recipes/ (before the cwd's
    # own moecompress/ can shadow it)
    mkdir -p /tmp/moecompress_shim
    printf 'import sys\nsys.path.insert(0, %s)\nimport moecompress\nmoecompress.__path__.append(%s)\n' \
        "'$REPO'" "'$REPO'" >/tmp/moecompress_shim/sitecustomize.py
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/moecompress_shim
    note "setup: pip -e did not make moecompress importable; using /tmp/moecompress_shim/sitecustomize.py"
fi

# scripts run by path (benchmarks/*.py) put benchmarks/ first on sys.path, not the repo: without an
# installed package they would not find moecompress (first GPU run, 2026-12-04). The package lives
# entirely under moecompress/, so the repo on PYTHONPATH is enough.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# which of the imports we need are missing (hard: runtime, kernels, quantize; tests: pytest, click)
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib
hard = ("torch", "triton", "transformers", "safetensors", "tokenizers", "tqdm", "yaml", "numpy", "pydantic")
for group, names in (("needed by runtime/kernels/quantize", hard), ("needed by the tests", ("pytest", "click"))):
    missing = []
    for n in names:
        try:
            importlib.import_module(n)
        except Exception as e:
            missing.append(f"{n} ({type(e).__name__})")
    print(f"setup: {group}: " + ("all present" if not missing else "MISSING " + ", ".join(missing)))
for m in ("moecompress.runtime", "moecompress.kernels.bench", "moecompress.pipeline"):
    try:
        importlib.import_module(m)
        print(f"setup: import {m}: ok")
    except Exception as e:
        print(f"setup: import {m}: FAILED {type(e).__name__}: {e}")
EOF

# ------------------------------------------------------------------ steps
for s in "${steps[@]}"; do
    case $s in
    tests)
        extra=()
        "$PY" -c "import click" >/dev/null 2>&1 || extra+=(--ignore=tests/test_runtime_cli.py)
        "$PY" -c "import pydantic" >/dev/null 2>&1 || extra+=(--continue-on-collection-errors)
        "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && extra+=(--timeout=180)
        run_step tests "$(limit tests)" env TRITON_INTERPRET=0 "$PY" -m pytest -q -x -rfEs \
            --durations=15 -p no:cacheprovider "${extra[@]}" ${TESTS:-tests/test_kernels_*.py tests/test_runtime_*.py \
            tests/test_pipeline_cuda.py}
        ;;
    zero)
        run_step zero "$(limit zero)" env TRITON_INTERPRET=0 "$PY" -m moecompress.kernels.bench \
            --shapes qwen3-30b-a3b --tokens 1,4,16,64 --dtypes bf16,int4 --zero-frac 0,0.25,0.5,0.75 --cuda-graph \
            --iters 100 --baseline-iters 5 --json "$OUT/zero_bench.json"
        ;;
    align)  # the zero-slot bench with the one-launch Triton moe_align forced on (MOECOMPRESS_TRITON_ALIGN=1)
        run_step align "$(limit align)" env TRITON_INTERPRET=0 MOECOMPRESS_TRITON_ALIGN=1 "$PY" -m moecompress.kernels.bench \
            --shapes qwen3-30b-a3b --tokens 1,4,16 --dtypes bf16,int4 --zero-frac 0,0.5 --cuda-graph \
            --iters 100 --baseline-iters 3 --json "$OUT/align_bench.json"
        ;;
    sweep)  # decode tiles with more programs in flight, at 0% and 50% zero slots (SWEEP_CONFIGS: ;-separated JSON).
        # Default: split-K (session 11, untested on a GPU): at T <= 16 a few experts' serial K loops set the time;
        # the 2026-12-04 sweep of plain tiles is in RESULTS.md
        default_sweep='{"BLOCK_N":32,"BLOCK_K":128,"SPLIT_K":2};{"BLOCK_N":32,"BLOCK_K":128,"SPLIT_K":4};{"BLOCK_N":32,"BLOCK_K":64,"SPLIT_K":8};{"BLOCK_N":64,"BLOCK_K":128,"SPLIT_K":4}'
        IFS=';' read -r -a cfgs <<<"${SWEEP_CONFIGS:-$default_sweep}"
        per=$(( $(limit sweep) / ${#cfgs[@]} ))
        for j in "${!cfgs[@]}"; do
            run_step "sweep$j" "$per" env TRITON_INTERPRET=0 "$PY" -m moecompress.kernels.bench \
                --shapes qwen3-30b-a3b --tokens 1,4,16,64 --dtypes bf16,int4 --zero-frac 0,0.5 --cuda-graph \
                --iters 100 --baseline-iters 3 --config "${cfgs[$j]}" --json "$OUT/sweep$j.json"
        done
        ;;
    layer)
        run_step layer "$(limit layer)" env TRITON_INTERPRET=0 "$PY" benchmarks/gpu_layer_time.py \
            --layers "${E2E_LAYERS:-4}" --samples "${LAYER_SAMPLES:-128}" --seq-len "${LAYER_SEQ:-2048}" \
            --methods "${LAYER_METHODS:-gptq}" --workdir "${E2E_WORKDIR:-/tmp/moecompress_e2e}" --json "$OUT/layer.json"
        ;;
    bench)
        run_step bench "$(limit bench)" env TRITON_INTERPRET=0 "$PY" -m moecompress.kernels.bench \
            --json "$OUT/kernels_bench.json"
        ;;
    e2e)
        run_step e2e "$(limit e2e)" env TRITON_INTERPRET=0 "$PY" benchmarks/e2e_decode.py \
            --device cuda --layers "${E2E_LAYERS:-4}" --workdir "${E2E_WORKDIR:-/tmp/moecompress_e2e}" \
            --json "$OUT/e2e.json"
        ;;
    zeda)  # two thirds of the step's time for the training, the rest for the eval
        secs=$(limit zeda)
        zdir=${ZEDA_WORKDIR:-/tmp/moecompress_zeda}
        zmodel=${ZEDA_MODEL:-$zdir/tiny}
        if [ -z "${ZEDA_MODEL:-}" ] && [ ! -f "$zmodel/config.json" ]; then
            "$PY" -c "from moecompress.tiny import save_tiny; save_tiny('qwen3_moe', '$zmodel')" >>"$SETUP" 2>&1
        fi
        run_step zeda $((secs * 2 / 3)) env TRITON_INTERPRET=0 "$PY" -m moecompress zeda "$zmodel" --out "$zdir/out" \
            --overwrite --device cuda --prompts "${ZEDA_PROMPTS:-64}" --stage1-steps "${ZEDA_STEPS1:-40}" \
            --stage2-steps "${ZEDA_STEPS2:-20}"
        cp "$zdir/out/zeda_log.json" "$OUT/zeda_log.json" 2>/dev/null
        run_step zeda-eval $((secs - secs * 2 / 3)) env TRITON_INTERPRET=0 "$PY" -m moecompress eval "$zdir/out" \
            --reference "$zmodel" --device cuda --samples 16 --seq-len 128 --json "$OUT/zeda_eval.json"
        ;;
    offload)  # a third of the step's time for the tests, the rest for the measurement
        secs=$(limit offload)
        run_step offload-tests $((secs / 3)) env TRITON_INTERPRET=0 "$PY" -m pytest -q -x -rfEs -p no:cacheprovider \
            tests/test_runtime_cpu_packed.py -k offload
        run_step offload $((secs - secs / 3)) env TRITON_INTERPRET=0 "$PY" benchmarks/offload_decode.py --device cuda \
            --near all,96,64,32,0 --new-tokens 16 --repeats 3 --workdir "${OFFLOAD_WORKDIR:-/tmp/moecompress_offload}" \
            --json "$OUT/offload.json"
        ;;
    tune)  # block-output tuning of a whole Qwen3-30B-A3B MoE block in bf16: GPU memory and step time
        run_step tune "$(limit tune)" env TRITON_INTERPRET=0 "$PY" benchmarks/tune_memory.py --device cuda \
            --experts "${TUNE_EXPERTS:-128}" --tokens "${TUNE_TOKENS:-4096}" --steps 8
        ;;
    esac
done
note "=== done; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
