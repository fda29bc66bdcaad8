#!/usr/bin/env bash
# svd-act against plain SVD initialization (bench/SCIENCE.md): for two model
# settings and three teacher seeds, students at ranks 1, 2, 4, 8 made with
# each initialization, evaluated right after factorization (0 epochs) and
# after a short distillation. Prints every command and its result; the last
# lines are two tables (mean ± sample std over the seeds): accuracy, and the
# per-layer relative output error on the calibration inputs that svd-act
# minimizes (the mean over the student's factorized layers, from the
# factorize table, against plain SVD's on the same inputs).
#
#     bash scripts/svd_act_vs_svd.sh [BIN] [WORK]      (defaults: target/debug/effrank-engine, /tmp/svd-act)
#
# Settings: "demo" is vit-demo on the demo data (16 px, width 64, 2 blocks);
# "wide" is vit-demo at width 128, 4 blocks, 4 heads, MLP 256. Teachers:
# 12 epochs, lr 2e-3, batch 64 (the demo's). Students: --epochs
# $STUDENT_EPOCHS (default 2) of KD (the sweep's default loss), lr 2e-3,
# batch 64, the teacher's seed; svd-act calibrates on the first 256
# training images. Everything on the CPU.
set -euo pipefail
BIN=${1:-target/debug/effrank-engine}
WORK=${2:-/tmp/svd-act}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
RANKS=1,2,4,8
mkdir -p "$WORK"
run() { echo "+ $*" >&2; "$@"; }

declare -A SHAPE=([demo]="" [wide]="--width 128 --depth 4 --heads 4 --mlp 256")
for setting in demo wide; do
  for seed in 0 1 2; do
    t="$WORK/$setting/teacher-s$seed"
    # shellcheck disable=SC2086
    [ -f "$t/summary.json" ] || run "$BIN" train --model vit-demo ${SHAPE[$setting]} --data demo --epochs 12 --lr 2e-3 --batch 64 \
      --seed "$seed" --device cpu --quiet --out "$t" >&2
    for init in svd svd-act; do
      for r in ${RANKS//,/ }; do
        s="$WORK/$setting/$init-s$seed-r$r.safetensors"
        table=$(run "$BIN" factorize --teacher "$t/model.safetensors" --rank "$r" --init "$init" --out "$s")
        if [ "$init" = svd-act ]; then
          # Layer rows end in rel.err, out.err, svd.out.
          echo "$table" | awk -v s="$setting" -v seed="$seed" -v r="$r" '$1 ~ /^blocks\./ { n++; a += $(NF-1); b += $NF }
            END { printf "OUTERR %s seed=%s rank=%s act=%.4f svd=%.4f\n", s, seed, r, a / n, b / n }'
        fi
        top1=$(run "$BIN" eval --checkpoint "$s" --device cpu --json --quiet | python3 -c 'import json,sys; print(json.load(sys.stdin)["top1"])')
        echo "RESULT $setting $init seed=$seed rank=$r epochs=0 top1=$top1"
      done
      out="$WORK/$setting/sweep-$init-s$seed"
      run "$BIN" sweep --teacher "$t/model.safetensors" --ranks "$RANKS" --seeds "$seed" --init "$init" --epochs "$STUDENT_EPOCHS" \
        --lr 2e-3 --batch 64 --device cpu --quiet --no-analyze --out "$out" > /dev/null
      python3 - "$out/results.jsonl" "$setting" "$init" "$seed" "$STUDENT_EPOCHS" <<'EOF'
import json, sys
path, setting, init, seed, epochs = sys.argv[1:]
for line in open(path):
    rec = json.loads(line)
    if rec["kind"] == "teacher":
        print(f"RESULT {setting} teacher seed={seed} rank=0 epochs=12 top1={rec['top1']}")
    else:
        print(f"RESULT {setting} {init} seed={seed} rank={rec['rank']} epochs={epochs} top1={rec['top1']}")
EOF
    done
  done
done | tee "$WORK/results.txt"

python3 - "$WORK/results.txt" <<'EOF'
import statistics, sys
from collections import defaultdict
rows, errors, teachers = defaultdict(list), defaultdict(list), {}
value = lambda field: field.split("=")[1]
for line in open(sys.argv[1]):
    if line.startswith("OUTERR"):
        _, setting, seed, rank, act, svd = line.split()
        errors[(setting, int(value(rank)))].append((float(value(act)), float(value(svd))))
        continue
    _, setting, init, seed, rank, epochs, top1 = line.split()
    if init == "teacher":
        teachers[(setting, seed)] = 100 * float(value(top1))
        continue
    rows[(setting, init, int(value(rank)), int(value(epochs)))].append(100 * float(value(top1)))
def cell(v):
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
print("| setting | teacher | rank | epochs | svd | svd-act | svd-act − svd (per seed) |")
print("|---|---|---|---|---|---|---|")
for setting in ["demo", "wide"]:
    teacher = cell([a for (s, _), a in teachers.items() if s == setting])
    for epochs in sorted({k[3] for k in rows if k[1] == "svd"}):
        for rank in sorted({k[2] for k in rows if k[0] == setting and k[1] == "svd"}):
            a, b = rows[(setting, "svd", rank, epochs)], rows[(setting, "svd-act", rank, epochs)]
            diff = [y - x for x, y in zip(a, b)]
            print(f"| {setting} | {teacher} | {rank} | {epochs} | {cell(a)} | {cell(b)} | {' / '.join(f'{d:+.1f}' for d in diff)} |")
print()
print("| setting | rank | relative output error, svd | svd-act |")
print("|---|---|---|---|")
for (setting, rank), pairs in sorted(errors.items()):
    print(f"| {setting} | {rank} | {statistics.mean(p[1] for p in pairs):.3f} | {statistics.mean(p[0] for p in pairs):.3f} |")
EOF
