#!/usr/bin/env bash
# Submit a whole effective-rank sweep to Slurm as three dependent jobs:
#   1. the teacher (one GPU),
#   2. a job array, one task per shard of the ranks (one GPU each),
#      started only when the teacher finished (afterok),
#   3. the analysis, started only when every array task finished (afterok).
#
# Usage (from the repository root, on the cluster's login node):
#   OUT=/shared/runs/sweep DATA=/shared/cifar-100-binary TASKS=8 deploy/slurm/submit.sh
#
# Settings (environment):
#   BIN       the effrank-engine binary (default: target/release/effrank-engine)
#   OUT       results folder on a file system every node sees (required)
#   DATA      --data for train and sweep (default: demo)
#   TEACHER   an existing teacher checkpoint: skips job 1
#   TRAIN_ARGS  extra flags of `train` (default: the demo teacher's)
#   RANKS     comma-separated ranks (default: the reference grid)
#   SWEEP_ARGS  extra flags of `sweep` (epochs, lr, loss, seeds, ...)
#   TASKS     array size: number of shards (default 4)
#   GPUS      GPUs per job (default 1; 0 on a CPU-only cluster)
#   PARTITION, ACCOUNT, TIME  passed to sbatch when set
# Prints the three job ids. A failing task fails the array, so the analysis
# job never starts on partial results; resubmit the failed index with
#   sbatch --array=<index> ... (see README.md, "Scale out").
set -euo pipefail
BIN=${BIN:-target/release/effrank-engine}
OUT=${OUT:?set OUT to a results folder on a shared file system}
DATA=${DATA:-demo}
RANKS=${RANKS:-2,4,8,16,24,32,48,64,80,96,112,128,160,192,224,256}
TASKS=${TASKS:-4}
GPUS=${GPUS:-1}
TRAIN_ARGS=${TRAIN_ARGS:---model vit-demo --epochs 12 --lr 2e-3}
SWEEP_ARGS=${SWEEP_ARGS:-}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)

common=(--parsable --chdir "$PWD")
[ "$GPUS" -gt 0 ] && common+=(--gres "gpu:$GPUS")
[ -n "${PARTITION:-}" ] && common+=(--partition "$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account "$ACCOUNT")
[ -n "${TIME:-}" ] && common+=(--time "$TIME")

dependency=()
if [ -z "${TEACHER:-}" ]; then
  TEACHER="$OUT/teacher/model.safetensors"
  teacher_job=$(sbatch "${common[@]}" --job-name effrank-teacher -o "$OUT/logs/teacher-%j.out" \
    --wrap "$BIN train --data $DATA $TRAIN_ARGS --out $OUT/teacher --quiet")
  echo "teacher job $teacher_job"
  dependency=(--dependency "afterok:$teacher_job")
fi

array_job=$(sbatch "${common[@]}" "${dependency[@]}" --job-name effrank-sweep --array "0-$((TASKS - 1))" \
  -o "$OUT/logs/sweep-%A_%a.out" \
  --wrap "$BIN sweep --teacher $TEACHER --data $DATA --ranks $RANKS --out $OUT --no-analyze --quiet $SWEEP_ARGS")
echo "sweep array job $array_job ($TASKS tasks; each reads its shard from SLURM_ARRAY_TASK_ID)"

analysis_job=$(sbatch --parsable --chdir "$PWD" --dependency "afterok:$array_job" --job-name effrank-analyze \
  -o "$OUT/logs/analyze-%j.out" --wrap "$BIN analyze --results $OUT")
echo "analysis job $analysis_job"
