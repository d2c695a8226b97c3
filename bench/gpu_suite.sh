#!/usr/bin/env bash
# The GPU check, on a bare GPU machine, in under ten minutes:
#
#     bash bench/gpu_suite.sh OUTDIR
#
# Phases (each under its own timeout, its exit code recorded; a failing phase does not stop the
# next one): env (versions), build (the extension from source for sm_90), backends (which can
# run), tests (python -m pytest -q tests -x, no TRITON_INTERPRET), sanitizer (compute-sanitizer
# memcheck on bench/sanitize_step.py), bench (bench/bench_step.py: JSON lines and the plot go
# to OUTDIR), training (bench/bench_training_step.py: GradScaler and CUDA-graph steps). Logs: OUTDIR/<phase>.log. Prints the benchmark table, then a summary table last.
# Exit status: 0 when every phase passed, 1 otherwise.
#
# Environment: PYTHON (default python3, else python), FUSED_ADAMW_CUDA_ARCHS (default 90),
# SUITE_BUDGET_S (default 570: the whole run's deadline, 30 s short of ten minutes),
# BENCH_ARGS (default "--reps 10 --warmup 3"), MAX_JOBS (passed on to the build).
set -u

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_suite.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export FUSED_ADAMW_CUDA_ARCHS="${FUSED_ADAMW_CUDA_ARCHS:-90}"
unset TRITON_INTERPRET
BENCH_ARGS="${BENCH_ARGS:---reps 10 --warmup 3}"
START=$(date +%s)
DEADLINE=$((START + ${SUITE_BUDGET_S:-570}))

PHASES=()
declare -A RC SECS

# phase NAME MAX_SECONDS CMD...: runs CMD under timeout min(MAX_SECONDS, time left), output to
# OUTDIR/NAME.log; records the exit code (124: timed out; "skip": no time left) and seconds.
phase() {
    local name=$1 want=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$(( want < left ? want : left ))
    PHASES+=("$name")
    if [ "$limit" -lt 5 ]; then
        RC[$name]="skip"
        SECS[$name]=0
        echo "== $name: skipped, no time left" | tee "$OUT/$name.log"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    RC[$name]=$?
    SECS[$name]=$(( $(date +%s) - t0 ))
    echo "== $name: rc=${RC[$name]} in ${SECS[$name]}s" | tee -a "$OUT/$name.log"
}

env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "--- nvidia-smi -L"; nvidia-smi -L
    echo "--- nvidia-smi"; nvidia-smi
    echo "--- nvcc --version"; nvcc --version || ls /usr/local/cuda*/bin/nvcc
    echo "--- $PY --version"; "$PY" --version
    echo "--- python packages"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
    "$PY" -c 'import triton; print("triton", triton.__version__)'
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pybind11|ninja|numpy|pytest|matplotlib|setuptools|fused)' || true
    echo "--- CPU"; nproc; grep -m1 'model name' /proc/cpuinfo
    echo "FUSED_ADAMW_CUDA_ARCHS=$FUSED_ADAMW_CUDA_ARCHS MAX_JOBS=${MAX_JOBS:-unset}"
    return 0
}

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n1)"

export PY
export -f env_info
phase env 30 bash -c env_info
phase build 210 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
phase backends 30 "$PY" -c 'import fused_adamw, fused_adamw._dispatch as d, fused_adamw._ext as e; print("fused_adamw", fused_adamw.__version__); print("_C:", e.unavailable_reason() or "loaded", getattr(e.C, "__file__", "")); [print(dev, name, reason or "available") for dev, row in d.report().items() for name, reason in row.items()]'
phase tests 150 "$PY" -m pytest -q tests -x
if [ -n "$SANITIZER" ] && [ -f bench/sanitize_step.py ]; then
    phase sanitizer 75 "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" bench/sanitize_step.py cuda,triton
else
    PHASES+=("sanitizer"); RC[sanitizer]="skip"; SECS[sanitizer]=0
    echo "== sanitizer: skipped (compute-sanitizer: ${SANITIZER:-not found}; bench/sanitize_step.py present: $([ -f bench/sanitize_step.py ] && echo yes || echo no))" | tee "$OUT/sanitizer.log"
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
phase bench 600 "$PY" bench/bench_step.py --out "$OUT" $BENCH_ARGS
phase training 120 "$PY" bench/bench_training_step.py --out "$OUT"

echo
echo "---------------------------------------------------------------- benchmark table"
grep -E '^\|' "$OUT/bench.log" || tail -n 20 "$OUT/bench.log"
echo
echo "---------------------------------------------------------------- tests (last lines)"
tail -n 5 "$OUT/tests.log"
echo
echo "---------------------------------------------------------------- summary ($(( $(date +%s) - START ))s in all; logs in $OUT)"
FAILED=0
printf '%-10s %-6s %6s  %s\n' phase rc secs log
for p in "${PHASES[@]}"; do
    printf '%-10s %-6s %6s  %s\n' "$p" "${RC[$p]}" "${SECS[$p]}" "$OUT/$p.log"
    [ "${RC[$p]}" = "0" ] || FAILED=1
done
exit $FAILED
