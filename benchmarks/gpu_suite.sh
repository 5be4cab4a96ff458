#!/usr/bin/env bash
# Every GPU check of the project in one run of at most ~8 minutes on one H100 / H200, written
# to ONE JSON document, $OUT/gpu_suite.json (plus the full log, $OUT/gpu_suite.log).
#
#   benchmarks/gpu_suite.sh              # on the GPU machine (python3 there holds CUDA torch)
#   benchmarks/gpu_suite.sh --dry-run    # rehearsal on a CPU: the same steps, tiny shapes
#
# Environment: OUT (default runs/gpu_suite), PYTHON (default .venv/bin/python when present,
# else python3), WHEELS (default .wheels, made by benchmarks/build_gpu_wheels.sh),
# GPU_SUITE_BUDGET_S (default 450: steps that would end later are cut or skipped).
#
# Steps, in order of importance; one that fails or overruns its limit is recorded and the
# suite goes on:
#   install       the carried wheels (deepspeed, webdataset, diffusers, torch-fidelity, ...)
#                 into a temporary folder put on PYTHONPATH, skipping packages already there
#   env           device, driver, versions, whether parallel.compile exists
#   gpu_tests     pytest -m gpu over the test files that hold GPU tests (junit per test)
#   attention     benchmarks/attention.py at ARFlow-XL/2 shapes in bf16, eager and compiled
#                 block ratio, sampling ratio (step 250 / step 1, batch 16 = 8 samples with CFG)
#   train_step.*  benchmarks/train_step.py, one case per process: {xl2,b2}-{zero2,fsdp2}-
#                 {compile,eager}: images/s, TFLOP/s, MFU, peak memory
#   fid_sampling  benchmarks/eval.py --preset xl256: XL/2, SDE 250 steps, CFG 1.5, VAE decode
#                 and Inception features: samples/s and peak GPU memory
#   checkpoint    benchmarks/checkpoint.py --device cuda, ARFlow-B/2 on local disk: the
#                 training stall of a background save (pinned staging) against a synchronous one
#
# JSON layout: {"suite": {dry_run, started, seconds}, "environment": {...}, "wheels":
# {installed, already_present, unmet_requirements, ...}, "gpu_tests": {passed, failed, error,
# skipped, tests: [{test, outcome, seconds, message}]}, "attention": {block, block_compiled,
# sampling, throughput}, "train_step": {case: {images_per_s, tflops_per_s, mfu, peak_memory_gb,
# ...}}, "fid_sampling": {runs: [{samples_per_s_per_rank, peak_gpu_mb, ...}]}, "checkpoint":
# {local: {sync_s, async_stall_s, stall_ratio, ...}}, "goals": {name:
# {value, target, met}}, "steps": [{name, status (ok|failed|timeout|skipped), rc, seconds,
# limit_s, error | reason}]}. A section whose step did not succeed holds {status: reason}.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/gpu_suite}
WHEELS=${WHEELS:-.wheels}
BUDGET_S=${GPU_SUITE_BUDGET_S:-450}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STARTED=$(date +%s)
DEADLINE=$((SECONDS + BUDGET_S))
STEP_NO=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export HF_HUB_OFFLINE=1
if [ "$DRY_RUN" = 1 ]; then
  # One thread per process: on a small shared CPU, two spinning OpenMP threads per process
  # made tiny benchmarks tens of times slower.
  export OMP_NUM_THREADS=1
else
  export DS_ACCELERATOR=cuda
fi

say() { echo "[gpu-suite $(date +%T)] $*" | tee -a "$LOG"; }

# record NAME STATUS RC SECONDS LIMIT [REASON]: one line of steps.jsonl.
record() {
  printf '{"name": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit_s": %d%s}\n' \
    "$1" "$2" "$3" "$4" "$5" "${6:+, \"reason\": \"$6\"}" >>"$WORK/steps.jsonl"
}

# step NAME CAP_S COMMAND...: run COMMAND for at most CAP_S seconds (less when the budget is
# nearly spent), stdout to WORK/NAME.out, stderr to WORK/NAME.err, both then into the log.
step() {
  local name=$1 cap=$2
  shift 2
  STEP_NO=$((STEP_NO + 1))
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    say "step $STEP_NO $name: skipped, the suite's ${BUDGET_S} s budget is spent"
    record "$name" skipped -1 0 "$limit" "suite budget of ${BUDGET_S} s spent"
    return
  fi
  say "step $STEP_NO $name (limit ${limit} s): $*"
  local t0=$SECONDS rc status
  timeout -k 10 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  {
    echo "----- $name: stdout"
    cat "$WORK/$name.out"
    echo "----- $name: stderr"
    cat "$WORK/$name.err"
  } >>"$LOG"
  record "$name" "$status" "$rc" $((SECONDS - t0)) "$limit"
  say "step $STEP_NO $name: $status (rc $rc) in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------- the steps
SITE="$WORK/site"
if [ ! -d "$WHEELS" ]; then
  say "no $WHEELS folder: nothing to install (benchmarks/build_gpu_wheels.sh makes it)"
  record install skipped -1 0 0 "no $WHEELS folder (benchmarks/build_gpu_wheels.sh makes it)"
elif [ "$DRY_RUN" = 1 ]; then
  # Here the venv has everything: install the whole folder for the GPU machine's CPython
  # instead, which checks that it is complete and installable there.
  step install 120 "$PYTHON" benchmarks/gpu_suite.py install "$WHEELS" "$SITE" --for-python 3.12
else
  step install 120 "$PYTHON" benchmarks/gpu_suite.py install "$WHEELS" "$SITE"
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
step env 30 "$PYTHON" benchmarks/gpu_suite.py env

mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
step gpu_tests 180 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
  --junitxml="$WORK/gpu_tests.xml" "${GPU_TEST_FILES[@]}"

if [ "$DRY_RUN" = 1 ]; then
  step attention 90 "$PYTHON" benchmarks/attention.py --device cpu --tiny --repeats 2
  TRAIN_ARGS=(--steps 2 --warmup 1)
  CASES=(tiny-zero2-compile tiny-fsdp2-eager)
  CASE_CAP=120
  FID_AFTER=tiny-fsdp2-eager
  EVAL_ARGS=(--preset digits --num-samples 8 --batch-size 8 --steps 4 --device cpu)
  CHECKPOINT_ARGS=(--model ARFlow-S/2 --input-size 8 --in-channels 3 --repeats 2 --device cpu)
else
  step attention 120 "$PYTHON" benchmarks/attention.py --device cuda --compile --repeats 20 \
    --sampling-batch 16
  TRAIN_ARGS=(--steps 10 --warmup 3)
  CASES=(xl2-zero2-compile xl2-fsdp2-compile xl2-zero2-eager xl2-fsdp2-eager
    b2-zero2-eager b2-fsdp2-eager b2-zero2-compile b2-fsdp2-compile)
  CASE_CAP=90
  FID_AFTER=xl2-fsdp2-eager  # FID sampling after the XL/2 training cases, before B/2's
  EVAL_ARGS=(--preset xl256 --num-samples 64 --batch-size 32 --device cuda)
  CHECKPOINT_ARGS=(--model ARFlow-B/2 --repeats 3 --device cuda)
fi
for case in "${CASES[@]}"; do
  step "train_step.$case" "$CASE_CAP" "$PYTHON" benchmarks/train_step.py --cases "$case" \
    "${TRAIN_ARGS[@]}"
  if [ "$case" = "$FID_AFTER" ]; then
    step fid_sampling 120 "$PYTHON" benchmarks/eval.py "${EVAL_ARGS[@]}"
  fi
done

step checkpoint 90 "$PYTHON" benchmarks/checkpoint.py --no-s3 "${CHECKPOINT_ARGS[@]}"

MERGE=("$PYTHON" benchmarks/gpu_suite.py merge "$WORK" "$OUT/gpu_suite.json" --started "$STARTED")
[ "$DRY_RUN" = 1 ] && MERGE+=(--dry-run)
"${MERGE[@]}" | tee -a "$LOG"
say "done in $(($(date +%s) - STARTED)) s: $OUT/gpu_suite.json"
