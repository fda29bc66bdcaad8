#!/usr/bin/env bash
# Runs on the lent GPU machine over executables built on the dev machine and
# carried in .gpu/ (see README, "GPU"). Writes each step's full output to
# $OUT/<step>.log; the raw logs are committed under bench/logs/.
#
#   bash scripts/gpu_session.sh tests kernels demo demo-fp32 democpu step pytorch-eager pytorch
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
G=.gpu
header() { echo "\$ $*"; date -u; nvidia-smi 2>&1 | head -12; echo; }
for step in "$@"; do
  log="$OUT/$step.log"
  case "$step" in
    tests)   cmd="$G/cuda_ops --include-ignored --test-threads=1 --nocapture" ;;
    kernels) cmd="$G/bench_kernels --bench" ;;
    step)    cmd="$G/bench_step --bench" ;;
    pytorch) cmd="python3 scripts/bench_pytorch_gpu.py --out $OUT/pytorch_gpu.json" ;;
    pytorch-r32) cmd="python3 scripts/bench_pytorch_gpu.py --ranks 32 --out $OUT/pytorch_gpu_r32.json" ;;
    pytorch-eager) cmd="python3 scripts/bench_pytorch_gpu.py --no-compile --out $OUT/pytorch_gpu_eager.json" ;;
    demo-fp32) cmd="$G/effrank-engine sweep --demo --device cuda-fp32 --quiet --out /tmp/demo_cuda_fp32" ;;
    demo)    cmd="$G/effrank-engine sweep --demo --device cuda --quiet --out /tmp/demo_cuda" ;;
    democpu) cmd="$G/effrank-engine sweep --demo --device cpu --quiet --out /tmp/demo_cpu" ;;
    *) echo "unknown step $step"; continue ;;
  esac
  { header "$cmd"; /usr/bin/time -f "wall %e s" timeout "${STEP_TIMEOUT:-140}" $cmd; echo "exit $?"; } > "$log" 2>&1
  echo "== $step: $(tail -1 "$log")"; tail -25 "$log"
done
