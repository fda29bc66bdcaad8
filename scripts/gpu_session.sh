#!/usr/bin/env bash
# Runs on the lent GPU machine over the executables that scripts/gpu_build.sh
# built on the dev machine and the device tool carried in .gpu/ (README,
# "GPU"). Each step writes its full output to $OUT/<step>.log and prints a
# one-line result; the last lines are a summary table. The raw logs are
# committed under bench/logs/.
#
#   bash scripts/gpu_session.sh all            # tests step kernels pytorch demo demo-new sanitize ncu
#   bash scripts/gpu_session.sh tests kernels demo demo-new demo-fp32 democpu step pytorch-eager pytorch pytorch-r32 sanitize ncu
#
# The demo sweeps start from an empty output folder (a rerun is a new run).
# demo-new: the demo sweep with every path that is off by default on and
# --profile (the per-op device time of the whole sweep at exit).
#
# Every step has its own time limit, and all steps together stay within
# SESSION_BUDGET seconds of wall time (default 470, under the 8 minutes the
# prepared run has): a step gets the smaller of its limit and what is left,
# and a step with under 10 s left is skipped and says so. Without a GPU
# (nvidia-smi -L fails: a rehearsal on the dev machine) every step still
# starts: the test executables list their CUDA tests and run one, which
# says there is no GPU; the benches and the demo say so themselves.
set -u
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
G=.gpu
BUDGET="${SESSION_BUDGET:-470}"
START=$(date +%s)
if nvidia-smi -L >/dev/null 2>&1; then GPU=1; else GPU=0; fi
# The CUDA tests of the library: every op's CPU-vs-CUDA comparison, on the
# default paths and with the new paths on (test names end in cuda_fp32,
# cuda_bf16, cuda_fp32_new_paths, cuda_bf16_new_paths), and the fused
# low-rank kernels' own test (several filters: a test runs when any matches).
CUDA_TESTS="cuda_ fused_kernels_directly"

header() { echo "\$ $*"; date -u; nvidia-smi 2>&1 | head -12; echo; }

tests() {
    if [ "$GPU" = 0 ]; then
        echo "no GPU (nvidia-smi -L failed): listing the CUDA tests and running one, which must say so"
        "$G/lib_tests" --include-ignored --list $CUDA_TESTS | tail -3
        "$G/cuda_model" --include-ignored --list | tail -3
        "$G/lib_tests" --include-ignored --exact ops::gelu::tests::forward_and_backward_match_the_cpu::cuda_bf16 2>&1 | grep -m1 "CUDA device 0"
        return 1
    fi
    local rc=0
    "$G/lib_tests" --include-ignored --test-threads=4 --nocapture $CUDA_TESTS || rc=1
    "$G/cuda_model" --include-ignored --test-threads=1 --nocapture || rc=1
    return $rc
}

# compute-sanitizer (memcheck) over the new kernels' tests in bf16.
sanitize() {
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "compute-sanitizer is not on the PATH"
        return 1
    fi
    local rc=0
    for t in ops::attention::tests::short_sequences_match_the_cpu::cuda_bf16_new_paths ops::add_layernorm::tests::forward_and_backward_match_the_cpu::cuda_bf16 ops::embed::tests::row_ops_match_the_cpu::cuda_bf16 ops::scale::tests::scale_matches_the_cpu::cuda_bf16 ops::gelu::tests::forward_and_backward_match_the_cpu::cuda_bf16; do
        compute-sanitizer --tool memcheck --error-exitcode 9 "$G/lib_tests" --include-ignored --exact "$t" || rc=1
    done
    return $rc
}

# Nsight Compute (--clock-control none: the clocks are left alone) on the new
# kernels as the short-attention test launches them in bf16: time, memory
# and SM throughput of each (the first launches only).
ncu_new() {
    if ! command -v ncu >/dev/null 2>&1; then
        echo "ncu is not on the PATH"
        return 1
    fi
    ncu --clock-control none --kernel-name regex:'attention_short|add_layernorm' --launch-count 8 --section SpeedOfLight \
        "$G/lib_tests" --include-ignored --exact ops::attention::tests::short_sequences_match_the_cpu::cuda_bf16_new_paths \
        ops::add_layernorm::tests::forward_and_backward_match_the_cpu::cuda_bf16
}

# The step bench: the headline table, the per-op breakdown and the protocol
# projection in bf16 (the first ranks), and the fp32 headline.
step() {
    "$G/bench_step" --bench
}

pytorch() {
    python3 scripts/bench_pytorch_gpu.py --ranks 16,32,64,128 --compile-ranks 32 --warmup 3 --iters 10 --sdpa --protocol --out "$OUT/pytorch_gpu.json"
}

# The time limit of each step, in seconds.
limit_of() {
    case "$1" in
        tests) echo 140 ;;
        step) echo 130 ;;
        kernels) echo 60 ;;
        pytorch) echo 150 ;;
        pytorch-r32|pytorch-eager) echo 120 ;;
        demo|demo-new|demo-fp32|democpu) echo 30 ;;
        sanitize) echo 50 ;;
        ncu) echo 40 ;;
        *) echo 60 ;;
    esac
}

command_of() {
    case "$1" in
        tests) echo "tests" ;;
        sanitize) echo "sanitize" ;;
        ncu) echo "ncu_new" ;;
        kernels) echo "$G/bench_kernels --bench" ;;
        step) echo "step" ;;
        pytorch) echo "pytorch" ;;
        pytorch-r32) echo "python3 scripts/bench_pytorch_gpu.py --ranks 32 --warmup 3 --iters 10 --out $OUT/pytorch_gpu_r32.json" ;;
        pytorch-eager) echo "python3 scripts/bench_pytorch_gpu.py --no-compile --warmup 3 --iters 10 --out $OUT/pytorch_gpu_eager.json" ;;
        demo-fp32) echo "rm -rf /tmp/demo_cuda_fp32 && $G/effrank-engine sweep --demo --device cuda-fp32 --quiet --out /tmp/demo_cuda_fp32" ;;
        demo) echo "rm -rf /tmp/demo_cuda && $G/effrank-engine sweep --demo --device cuda --quiet --out /tmp/demo_cuda" ;;
        demo-new) echo "rm -rf /tmp/demo_cuda_new && $G/effrank-engine sweep --demo --device cuda --short-attention on --fused-add-layernorm on --class-token-tail on --profile --quiet --out /tmp/demo_cuda_new" ;;
        democpu) echo "rm -rf /tmp/demo_cpu && $G/effrank-engine sweep --demo --device cpu --quiet --out /tmp/demo_cpu" ;;
        *) return 1 ;;
    esac
}

steps=("$@")
if [ "${#steps[@]}" = 1 ] && [ "${steps[0]}" = all ]; then
    # Most needed first: what is left out when time runs short comes last.
    steps=(tests step kernels pytorch demo demo-new sanitize ncu)
fi
if [ "$GPU" = 0 ]; then
    echo "== no GPU on this machine (nvidia-smi -L failed): a rehearsal; every step starts and says what it cannot do"
fi
export -f tests sanitize ncu_new step pytorch
export G GPU CUDA_TESTS OUT
summary=()
for s in "${steps[@]}"; do
    log="$OUT/$s.log"
    if ! cmd=$(command_of "$s"); then
        echo "== $s: unknown step (known: tests sanitize ncu kernels step pytorch pytorch-r32 pytorch-eager demo demo-new demo-fp32 democpu, or all)"
        summary+=("$(printf '%-14s unknown' "$s")")
        continue
    fi
    left=$((BUDGET - ($(date +%s) - START)))
    limit=$(limit_of "$s")
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $s: skipped, ${left}s of the ${BUDGET}s session budget left"
        summary+=("$(printf '%-14s skipped (budget)' "$s")")
        continue
    fi
    t0=$(date +%s)
    { header "$cmd"; timeout --kill-after=5 "$limit" bash -c "$cmd"; rc=$?; echo "exit $rc"; } > "$log" 2>&1
    rc=$(tail -1 "$log" | sed 's/^exit //')
    wall=$(($(date +%s) - t0))
    note=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (time limit ${limit}s)"
    echo "== $s: exit $rc$note, ${wall}s (log $log)"
    tail -25 "$log"
    summary+=("$(printf '%-14s exit %-4s %5ss%s' "$s" "$rc" "$wall" "$note")")
done
echo
echo "== summary ($(( $(date +%s) - START ))s of ${BUDGET}s; logs in $OUT)"
printf '%s\n' "${summary[@]}"
