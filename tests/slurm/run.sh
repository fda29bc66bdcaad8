#!/usr/bin/env bash
# End-to-end test of the sharded sweep on a real one-node Slurm (Debian's
# slurmctld/slurmd with munge, as ../shared/SLURM.md describes):
#   1. a 3-task job array runs the demo sweep; its merged results equal a
#      single-process run of the same sweep, rank by rank;
#   2. one array task is killed mid-rank; resubmitting only that index
#      finishes the sweep with no rank lost or duplicated;
#   3. two processes given the same shard by mistake leave every rank
#      recorded once;
#   4. an array task that fails makes `sbatch --wait` fail.
# Starts the daemons itself and stops them (by pid) on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
cargo build --quiet --bin effrank-engine
BIN=$ROOT/target/debug/effrank-engine
W=$(mktemp -d /tmp/effrank-slurm.XXXXXX)
STARTED=()

cleanup() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if [[ " ${STARTED[*]-} " == *" $pidfile "* ]] && [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT

start_slurm() {
  if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  local H MEM NPROC
  H=$(hostname -s); MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 85 / 100 )); NPROC=$(nproc)
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    STARTED+=(/run/munge/munged.pid)
  fi
  mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
  chown slurm:slurm /var/spool/slurmctld /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${NPROC} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if ! pgrep -x slurmctld >/dev/null; then slurmctld; STARTED+=(/run/slurmctld.pid); fi
  if ! pgrep -x slurmd >/dev/null; then slurmd; STARTED+=(/run/slurmd.pid); fi
  for _ in $(seq 60); do sinfo -h -o %T | grep -qx idle && return 0; sleep 0.5; done
  echo "slurm did not come up"; cat /var/log/slurm/slurmctld.log; exit 1
}

wait_job() { # poll until job $1 (and its array tasks) left the queue
  for _ in $(seq 1200); do
    [ -z "$(squeue -h -j "$1" 2>/dev/null)" ] && return 0
    sleep 0.5
  done
  echo "job $1 did not finish in 10 minutes"; exit 1
}

# Results as "rank seed top1" lines, sorted; fails on a duplicated job.
summarize() {
  python3 - "$1" <<'PY'
import glob, json, sys
seen = {}
for f in sorted(glob.glob(sys.argv[1] + "/results*.jsonl")):
    for line in open(f):
        r = json.loads(line)
        if r["kind"] != "student":
            continue
        key = (r["rank"], r["seed"])
        if key in seen:
            sys.exit(f"duplicated job {key} in {sys.argv[1]}")
        seen[key] = r["top1"]
for (rank, seed), top1 in sorted(seen.items()):
    print(rank, seed, repr(top1))
PY
}

ARGS=(--data demo --ranks 1,2,4,8 --epochs 1 --batch 64 --no-analyze --quiet --device cpu)
start_slurm
echo "-- teacher"
"$BIN" train --model vit-demo --data demo --epochs 2 --out "$W/teacher" --quiet --device cpu
T="$W/teacher/model.safetensors"

echo "-- 1. job array vs single process"
"$BIN" sweep --teacher "$T" "${ARGS[@]}" --out "$W/single"
jid=$(sbatch --parsable --array=0-2 -o "$W/array-%a.log" --wrap "$BIN sweep --teacher $T ${ARGS[*]} --out $W/array")
wait_job "$jid"
diff <(summarize "$W/single") <(summarize "$W/array")
[ "$(summarize "$W/array" | wc -l)" -eq 4 ]
echo "merged array results equal the single-process run"

echo "-- 2. a task killed mid-rank, then resubmitted alone"
LONG=(--data demo --ranks 1,2,4,8 --epochs 4 --batch 64 --no-analyze --quiet --device cpu)
"$BIN" sweep --teacher "$T" "${LONG[@]}" --out "$W/single4"
jid=$(sbatch --parsable --array=0-1 -o "$W/kill-%a.log" --wrap "$BIN sweep --teacher $T ${LONG[*]} --out $W/killed")
for _ in $(seq 600); do
  ls "$W"/killed/runs/*/metrics.jsonl >/dev/null 2>&1 && break
  sleep 0.2
done
scancel "${jid}_1"
wait_job "$jid"
jid=$(sbatch --parsable --array=1 -o "$W/resubmit-%a.log" --wrap "$BIN sweep --teacher $T ${LONG[*]} --out $W/killed")
wait_job "$jid"
diff <(summarize "$W/single4") <(summarize "$W/killed")
echo "no rank lost or duplicated after the kill and resubmission"

echo "-- 3. two processes given the same shard"
"$BIN" sweep --teacher "$T" "${ARGS[@]}" --shard 0/1 --out "$W/twice" & p1=$!
"$BIN" sweep --teacher "$T" "${ARGS[@]}" --shard 0/1 --out "$W/twice" & p2=$!
wait $p1; wait $p2
# Two writers may each finish a rank the other skipped; every rank is there
# once, equal to the single-process result.
diff <(summarize "$W/single") <(summarize "$W/twice")
echo "the same shard twice left every rank recorded once"

echo "-- 4. a failing task fails the step"
if sbatch --wait --array=0-1 -o "$W/fail-%a.log" --wrap "$BIN sweep --teacher $T --data demo --ranks 1,999 --epochs 1 --out $W/fail --quiet --device cpu" >/dev/null 2>&1; then
  echo "a failing array task did not fail sbatch --wait"; exit 1
fi
echo "sbatch --wait failed as it should"
echo "slurm test: 4 passed, 0 failed"
