#!/usr/bin/env bash
# The GPU check for a bare H100/H200 lent for a few minutes (no network):
#
#     bash bench/gpu_suite.sh OUT [--budget SECONDS]   # default budget 420 s
#     bash bench/gpu_suite.sh --plan [--budget SECONDS]  # the stages and their time budgets
#
# Stages, in priority order, each under its own timeout (its budget, cut to the time the run
# has left); each writes its log into OUT as it ends, so a run cut short returns what it
# measured:
#   build      versions; _C built in place for this GPU's arch only (MAX_JOBS=16); then
#              `python -m fused_adamw --json` must show _C with CUDA that can launch here, and
#              one FusedAdamW(backend="cuda") step must run and match the CPU loop: else the
#              run stops at once, non-zero, saying why
#   tests      the GPU tests (TESTS below, -k "$TEST_K", not slow, no -x), a per-test timeout
#   sanitizer  compute-sanitizer memcheck, then racecheck, on bench/sanitize_step.py (one small
#              step of each kernel family: plain, amsgrad, GradScaler, low precision)
#   bench      bench/bench_step.py --suite: cuda, triton, torch fused; fresh grads
#   extras     bench/bench_training_step.py, bench/bench_clip.py --device cuda (clip + step
#              against torch's clip_grad_norm_ + fused step), then bench/bench_lowprec.py --quick
# OUT holds at most 7 files, no folder: summary.json (rewritten after every stage),
# build.log, tests.log, sanitizer.log, bench.log, bench.jsonl, extras.log.
# The last line says which stages passed, failed or were cut for time.
# Exit status: 0 all passed; 1 a stage failed or was cut; 2 usage; 3 no GPU here (found before
# anything is built, in seconds); 4 the CUDA backend could not run a kernel (build stage).
#
# Environment: PYTHON (default python3, else python), MAX_JOBS (default 16), GPU_SUITE_COMMIT
# (the commit to record when the tree has no git metadata).
set -u

STAGES=(build tests sanitizer bench extras)
declare -A BUDGET=([build]=170 [tests]=120 [sanitizer]=80 [bench]=75 [extras]=35)
declare -A WHAT=(
    [build]="versions; _C for this GPU's arch (MAX_JOBS=16); _C can launch; one cuda step"
    [tests]="GPU tests (low precision, plain kernels, GradScaler, capture, Triton, streams)"
    [sanitizer]="compute-sanitizer memcheck + racecheck, one step of each kernel family"
    [bench]="bench_step.py --suite: cuda, triton, torch fused; fresh grads; kernel time"
    [extras]="bench_training_step.py, bench_clip.py, then bench_lowprec.py --quick (time left)"
)
# The GPU tests, most important first; -k keeps the tests that touch CUDA (module, class or
# parameter names); test_gpu_suite.py is this script's own CPU test.
TESTS=(tests/test_gpu_kernels.py tests/test_cuda_kernel.py tests/test_amp.py
       tests/test_capture.py tests/test_triton.py tests/test_lowp.py tests/test_optimizer.py
       tests/test_inplace.py tests/test_api.py tests/test_adam_forms.py)
TEST_K="(cuda or gpu or capture) and not gpu_suite"
TEST_TIMEOUT_S=60
MIN_STAGE_S=10  # a stage with less time left than this is cut without starting

usage() {
    echo "usage: bash bench/gpu_suite.sh OUT [--budget SECONDS] | --plan [--budget SECONDS]" >&2
    exit 2
}

OUT_ARG="" PLAN=0 TOTAL_BUDGET=420
while [ $# -gt 0 ]; do
    case "$1" in
        --plan) PLAN=1 ;;
        --budget)
            [ $# -ge 2 ] || usage
            TOTAL_BUDGET=$2
            shift ;;
        --budget=*) TOTAL_BUDGET=${1#--budget=} ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) [ -z "$OUT_ARG" ] || usage; OUT_ARG=$1 ;;
    esac
    shift
done
case "$TOTAL_BUDGET" in
    ''|*[!0-9]*) echo "--budget: expected whole seconds, got '$TOTAL_BUDGET'" >&2; exit 2 ;;
esac

if [ "$PLAN" = 1 ]; then
    sum=0
    for s in "${STAGES[@]}"; do
        printf '%-10s %4d s  %s\n' "$s" "${BUDGET[$s]}" "${WHAT[$s]}"
        sum=$((sum + BUDGET[$s]))
    done
    echo "total ${sum} s (the stages' budgets; a run stops at --budget," \
        "${TOTAL_BUDGET} s, and cuts the stages left)"
    exit 0
fi
[ -n "$OUT_ARG" ] || usage

START=$(date +%s)
DEADLINE=$((START + TOTAL_BUDGET))
mkdir -p "$OUT_ARG" || exit 2
OUT="$(cd "$OUT_ARG" && pwd)"
cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET

declare -A STATUS SECS WHY
for s in "${STAGES[@]}"; do STATUS[$s]="not run"; SECS[$s]=0; WHY[$s]=""; done
# A copy of the tree without .git (a lent machine's) can be told its commit: GPU_SUITE_COMMIT.
COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null ||
          echo "${GPU_SUITE_COMMIT:-unknown (no git metadata; set GPU_SUITE_COMMIT)}")"
DEVICE="unknown"
CUDA_RAN=false

json_str() {  # a JSON string of $1
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ }
    printf '"%s"' "${s//$'\t'/ }"
}

write_summary() {
    {
        printf '{"commit": %s, "device": %s, "budget_s": %d, "elapsed_s": %d, ' \
            "$(json_str "$COMMIT")" "$(json_str "$DEVICE")" "$TOTAL_BUDGET" \
            "$(($(date +%s) - START))"
        printf '"cuda_kernel_ran": %s, "stages": [' "$CUDA_RAN"
        local sep=""
        for s in "${STAGES[@]}"; do
            printf '%s{"stage": "%s", "status": "%s", "seconds": %d, "budget_s": %d, "why": %s}' \
                "$sep" "$s" "${STATUS[$s]}" "${SECS[$s]}" "${BUDGET[$s]}" \
                "$(json_str "${WHY[$s]}")"
            sep=", "
        done
        printf ']}\n'
    } >"$OUT/summary.json"
}

# last_line [EXTRA]: the run's verdict, one line.
last_line() {
    local ran=() passed=() failed=() cut=() s
    for s in "${STAGES[@]}"; do
        case "${STATUS[$s]}" in
            passed) ran+=("$s"); passed+=("$s") ;;
            failed) ran+=("$s"); failed+=("$s") ;;
            cut) cut+=("$s") ;;
        esac
    done
    local IFS=,
    echo "gpu_suite: ran ${ran[*]:-none}; passed ${passed[*]:-none};" \
        "failed ${failed[*]:-none}; cut for time ${cut[*]:-none};" \
        "$(($(date +%s) - START)) s of ${TOTAL_BUDGET} s${1:+; $1}"
}

stop_no_gpu() {
    local why="no GPU: $*"
    echo "$why" | tee -a "$OUT/build.log"
    STATUS[build]="failed"
    WHY[build]="$why"
    write_summary
    last_line "$why"
    exit 3
}

# time_left_for STAGE: prints the stage's limit (its budget, cut to the run's time left).
time_left_for() {
    local left=$((DEADLINE - $(date +%s)))
    echo $((BUDGET[$1] < left ? BUDGET[$1] : left))
}

# run_in STAGE LIMIT CMD...: CMD under `timeout LIMIT`, output appended to OUT/STAGE.log;
# returns CMD's status (124 when it ran out of time).
run_in() {
    local stage=$1 limit=$2
    shift 2
    echo "\$ $*   (limit ${limit} s)" >>"$OUT/$stage.log"
    timeout -k 5 "$limit" "$@" >>"$OUT/$stage.log" 2>&1
}

# finish STAGE RC T0 [WHY]: records the stage's result (WHY: what to say about it).
finish() {
    local stage=$1 rc=$2
    SECS[$stage]=$(($(date +%s) - $3))
    WHY[$stage]="${4:-}"
    if [ "$rc" = 0 ]; then
        STATUS[$stage]="passed"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STATUS[$stage]="cut"
        WHY[$stage]="out of time (its ${BUDGET[$stage]} s, or the run's budget)${4:+: $4}"
    else
        STATUS[$stage]="failed"
        WHY[$stage]="${4:-exit status $rc}"
    fi
    echo "== $stage: ${STATUS[$stage]} in ${SECS[$stage]} s${WHY[$stage]:+ (${WHY[$stage]})}" |
        tee -a "$OUT/$stage.log"
    write_summary
}

# starts STAGE: sets LIMIT to the stage's limit and returns 0, or records the stage as cut
# and returns 1 when too little time is left to start it.
starts() {
    LIMIT=$(time_left_for "$1")
    if [ "$LIMIT" -lt "$MIN_STAGE_S" ]; then
        STATUS[$1]="cut"
        WHY[$1]="not started: ${LIMIT} s left of the run's ${TOTAL_BUDGET} s"
        echo "== $1: cut (${WHY[$1]})" | tee -a "$OUT/$1.log"
        write_summary
        return 1
    fi
    echo "== $1 (limit ${LIMIT} s): ${WHAT[$1]}" | tee -a "$OUT/$1.log"
}

# ---------------------------------------------------------------------------- build
# this run's files only (OUT may hold an earlier run's)
rm -f "$OUT"/{summary.json,build.log,tests.log,sanitizer.log,bench.log,bench.jsonl,extras.log}
write_summary
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $COMMIT"
    git -C "$REPO" status --short 2>/dev/null | head -n 20
    echo "python: $PY ($("$PY" --version 2>&1))"
    echo "cores: $(nproc 2>/dev/null || echo unknown)"
} >>"$OUT/build.log"

# No GPU: say so in seconds, before anything is built. nvidia-smi (or a device node) first,
# then torch, which must see the device the kernels will run on.
if command -v nvidia-smi >/dev/null 2>&1; then
    if ! timeout 20 nvidia-smi -L >>"$OUT/build.log" 2>&1; then
        stop_no_gpu "nvidia-smi lists no GPU (driver not loaded?)"
    fi
elif ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    stop_no_gpu "no nvidia-smi on PATH and no /dev/nvidia* device: this machine has no NVIDIA GPU"
fi
PROBE=$(timeout 60 "$PY" -c '
import torch
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    print("none", torch.__version__, torch.version.cuda)
else:
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{major}{minor}", torch.cuda.get_device_name(0).replace(" ", "_"), torch.__version__,
          torch.version.cuda)
' 2>>"$OUT/build.log") || stop_no_gpu "torch cannot be imported or probed with $PY (see build.log)"
read -r ARCH NAME _ <<<"$PROBE"
echo "torch probe: $PROBE" >>"$OUT/build.log"
if [ "$ARCH" = "none" ]; then
    stop_no_gpu "torch sees no CUDA device (torch $PROBE;" \
        "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})"
fi
DEVICE="${NAME//_/ } (sm_$ARCH)"

if starts build; then
    T0=$(date +%s)
    {
        echo "device: $DEVICE"
        timeout 20 nvidia-smi 2>&1 || true
        nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not on PATH"
        "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
        "$PY" -m pip list 2>/dev/null |
            grep -i -E '^(torch|triton|pybind11|ninja|pytest|pytest-xdist|numpy) ' || true
    } >>"$OUT/build.log" 2>&1
    # In place (no pip: the image has no network, and no build isolation): python/fused_adamw/_C.
    FUSED_ADAMW_CUDA_ARCHS="$ARCH" run_in build "$LIMIT" "$PY" setup.py build_ext --inplace
    RC=$?
    WHY_BUILD=""
    if [ "$RC" = 0 ]; then
        # _C must have CUDA and launch on this device (python -m fused_adamw --json knows),
        # and one cuda-backend step must run and match the CPU loop.
        run_in build 60 "$PY" - <<'EOF'
import json, subprocess, sys
import torch
info = json.loads(subprocess.run([sys.executable, "-m", "fused_adamw", "--json"],
                                 capture_output=True, text=True, check=True).stdout)
ext, gpus = info["ext"], info["gpus"]
print("_C:", json.dumps(ext), "\ngpus:", json.dumps(gpus))
if not ext.get("available"):
    sys.exit(f"STOP: _C is not importable: {ext.get('reason') or ext}")
if not ext.get("has_cuda"):
    sys.exit(f"STOP: _C was built without CUDA: {info['build_config'].get('cuda_reason')}")
if not gpus or gpus[0]["cuda_kernel"] != "can run":
    why = gpus[0]["cuda_kernel"] if gpus else "no GPU listed"
    sys.exit(f"STOP: _C's CUDA kernel cannot launch here: {why}")
from fused_adamw import FusedAdamW
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(4099, device="cuda"))
q = torch.nn.Parameter(p.detach().cpu().clone())
opts = [FusedAdamW([p], lr=1e-2, backend="cuda"), FusedAdamW([q], lr=1e-2, backend="cpu")]
for _ in range(3):
    p.grad = torch.randn_like(p)
    q.grad = p.grad.cpu()
    for o in opts:
        o.step()
torch.cuda.synchronize()
diff = (p.detach().cpu() - q.detach()).abs().max().item()
# The kernel and the CPU loop differ by powf's few ulp at most (tests/test_cuda_kernel.py:
# below 1e-5 after these 3 steps); a kernel that did not run, or ran wrong, is off by ~lr.
if opts[0].backend != "cuda" or diff > 1e-4:
    sys.exit(f"STOP: the cuda backend's step does not match the CPU loop (max diff {diff})")
print(f"CUDA backend ran a kernel: yes (3 steps, max diff to the CPU loop {diff:.3g})")
EOF
        RC=$?
        [ "$RC" = 0 ] || WHY_BUILD="$(grep -m1 -o 'STOP: .*' "$OUT/build.log" ||
                                      echo "the check after the build failed (exit $RC)")"
    else
        WHY_BUILD="the build failed or ran out of time (exit $RC): see build.log"
    fi
    finish build "$RC" "$T0" "$WHY_BUILD"
    if [ "$RC" != 0 ]; then
        echo "the CUDA backend never ran a kernel: $WHY_BUILD; stopping" | tee -a "$OUT/build.log"
        last_line "stopped: $WHY_BUILD"
        exit 4
    fi
    CUDA_RAN=true
    write_summary
else
    last_line "stopped: no time to build"
    exit 4
fi

# ---------------------------------------------------------------------------- tests
if starts tests; then
    T0=$(date +%s)
    # pytest-xdist when the image has it: 6 workers (2 CPU threads each) share the GPU and
    # compile the Triton variants side by side; tests are handed out in order, so the most
    # important still run first.
    XDIST=()
    "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 6)
    OMP_NUM_THREADS=2 FUSED_ADAMW_TEST_TIMEOUT=$TEST_TIMEOUT_S run_in tests "$LIMIT" \
        "$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=10 "${XDIST[@]}" \
        -m "not slow" -k "$TEST_K" "${TESTS[@]}"
    RC=$?
    finish tests "$RC" "$T0" "$(grep -v '^[[:space:]]*$' "$OUT/tests.log" | tail -n 1)"
fi

# ---------------------------------------------------------------------------- sanitizer
if starts sanitizer; then
    T0=$(date +%s)
    SANITIZER="$(command -v compute-sanitizer)"
    for f in /usr/local/cuda*/bin/compute-sanitizer; do
        [ -z "$SANITIZER" ] && [ -x "$f" ] && SANITIZER=$f
    done
    if [ -z "$SANITIZER" ]; then
        echo "compute-sanitizer: not found" >>"$OUT/sanitizer.log"
        finish sanitizer 1 "$T0" "compute-sanitizer not found"
    else
        # One process per tool runs every family (torch's start-up under the sanitizer is
        # the slow part); memcheck (cuda, then triton) gets 60% of the stage, racecheck the
        # rest, on cuda only: racecheck looks at shared memory, which the CUDA kernel must
        # not use (its CPU emulation's contract) and Triton's elementwise kernel does not.
        # No caching allocator: each tensor its own cudaMalloc, so memcheck sees an access
        # past a tensor's end instead of into the next tensor of the same cached block.
        NO_CACHE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
        run_in sanitizer $((LIMIT * 6 / 10)) "${NO_CACHE[@]}" "$SANITIZER" --tool memcheck \
            --error-exitcode 9 --print-limit 20 "$PY" bench/sanitize_step.py --backends cuda,triton
        RC1=$?
        LEFT=$((LIMIT - ($(date +%s) - T0)))
        if [ "$LEFT" -ge "$MIN_STAGE_S" ]; then
            run_in sanitizer "$LEFT" "${NO_CACHE[@]}" "$SANITIZER" --tool racecheck \
                --error-exitcode 9 --print-limit 20 "$PY" bench/sanitize_step.py --backends cuda
            RC2=$?
        else
            RC2=124
        fi
        RC=$RC1
        [ "$RC" = 0 ] && RC=$RC2
        finish sanitizer "$RC" "$T0" \
            "memcheck exit $RC1, racecheck exit $RC2 (9: errors found; 124: out of time)"
    fi
fi

# ---------------------------------------------------------------------------- bench
if starts bench; then
    T0=$(date +%s)
    run_in bench "$LIMIT" "$PY" bench/bench_step.py --suite --out "$SCRATCH/bench" --plot none
    RC=$?
    # written case by case: a run cut short keeps what it measured
    cp "$SCRATCH/bench/results.jsonl" "$OUT/bench.jsonl" 2>/dev/null
    finish bench "$RC" "$T0"
fi

# ---------------------------------------------------------------------------- extras
if starts extras; then
    T0=$(date +%s)
    run_in extras "$LIMIT" "$PY" bench/bench_training_step.py --out "$SCRATCH/extras"
    RC=$?
    LEFT=$((LIMIT - ($(date +%s) - T0)))
    if [ "$RC" = 0 ] && [ "$LEFT" -ge "$MIN_STAGE_S" ]; then
        # issue #19: clip + step, 50M fp32 params and 5,000 tensors (a few seconds on a GPU)
        run_in extras "$LEFT" "$PY" bench/bench_clip.py --device cuda --reps 9 \
            --json "$SCRATCH/extras/clip.jsonl"
        RC=$?
        LEFT=$((LIMIT - ($(date +%s) - T0)))
    fi
    if [ "$RC" = 0 ] && [ "$LEFT" -ge "$MIN_STAGE_S" ]; then
        run_in extras "$LEFT" "$PY" bench/bench_lowprec.py --quick --out "$SCRATCH/extras"
        RC=$?
    elif [ "$RC" = 0 ]; then
        echo "bench_lowprec.py --quick: no time left" >>"$OUT/extras.log"
        RC=124
    fi
    for f in "$SCRATCH"/extras/*.jsonl "$SCRATCH"/extras/*.md; do
        [ -f "$f" ] && { echo "--- ${f##*/}"; cat "$f"; } >>"$OUT/extras.log"
    done
    finish extras "$RC" "$T0"
fi

# ---------------------------------------------------------------------------- summary
echo
grep -E '^\|' "$OUT/bench.log" 2>/dev/null || true
for s in "${STAGES[@]}"; do
    printf '%-10s %-8s %4s s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "${WHY[$s]}"
done
FAILED=0
for s in "${STAGES[@]}"; do [ "${STATUS[$s]}" = passed ] || FAILED=1; done
last_line "logs in $OUT"
exit $FAILED
