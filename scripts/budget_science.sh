#!/usr/bin/env bash
# Allocated (factorize --budget) against uniform-rank students at equal
# parameter counts, for bench/SCIENCE.md. Usage:
#   DISTILL="--epochs 6 --lr 2e-3 --batch 64" \
#   scripts/budget_science.sh BIN TEACHER OUT "RANKS" "SEEDS" "SENS_RANKS" IMAGES -- COMMON_FLAGS...
# (COMMON_FLAGS: data and device, given to sensitivity and distill.)
# Uniform students: distill --rank r; allocated: the budget of uniform rank r,
# factorize --budget from one sensitivity pass, distill --student; every
# student with the same $DISTILL flags and seed. Prints one line per student:
#   kind rank seed params top1 seconds
set -euo pipefail
bin=$1 teacher=$2 out=$3 ranks=$4 seeds=$5 sens_ranks=$6 images=$7
shift 7; [ "$1" = "--" ] && shift
mkdir -p "$out"
t0=$(date +%s.%N)
"$bin" sensitivity --teacher "$teacher" --ranks "$sens_ranks" --images "$images" \
    --out "$out/sens" --quiet "$@" 2>&1 | grep -v '^warning' | tee "$out/sensitivity.txt" >/dev/null
t1=$(date +%s.%N)
echo "sensitivity_seconds $(echo "$t1 - $t0" | bc)"
cat "$out/sensitivity.txt"
for r in $ranks; do
    params=$("$bin" factorize --teacher "$teacher" --rank "$r" --out "$out/u$r.safetensors" \
        | sed -n 's/.* -> \([0-9]*\) parameters.*/\1/p')
    "$bin" factorize --teacher "$teacher" --budget "$params" --sensitivity "$out/sens" \
        --out "$out/b$r.safetensors" > "$out/b$r.txt"
    sed -n '/^budget/p;/^per-layer ranks/,$p' "$out/b$r.txt" | grep -v '^student written'
    for s in $seeds; do
        for kind in uniform allocated; do
            student=$out/u$r.safetensors; [ $kind = allocated ] && student=$out/b$r.safetensors
            a=$(date +%s.%N)
            line=$("$bin" distill --teacher "$teacher" --student "$student" --seed "$s" \
                --out "$out/$kind-r$r-s$s" --quiet $DISTILL "$@" | grep '^student:')
            b=$(date +%s.%N)
            top1=$(echo "$line" | sed -n 's/student: test top-1 \([0-9.]*\)%.*/\1/p')
            sp=$(echo "$line" | sed -n 's/.*; \([0-9]*\) parameters.*/\1/p')
            echo "$kind $r $s $sp $top1 $(echo "$b - $a" | bc)"
        done
    done
done
