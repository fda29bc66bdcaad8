#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), every executable that
# scripts/gpu_session.sh runs on the lent GPU machine (which has no Rust),
# release, with every kernel compiled by NVRTC 13.0 (EFFRANK_REQUIRE_KERNELS=1:
# the build fails when NVRTC is missing or a kernel does not compile), and
# copies them into .gpu/ under stable names (cargo's JSON messages name the
# executables), without debug info:
#
#   .gpu/effrank-engine   the command line (demo sweep)
#   .gpu/lib_tests        the library's unit tests: every op's CPU-vs-CUDA test
#   .gpu/cuda_model       tests/cuda_model.rs: the whole model on the GPU vs the CPU
#   .gpu/bench_kernels    benches/kernels.rs
#   .gpu/bench_step       benches/step.rs
#
# Checks that .gpu/ plus the working tree that travels fit the device tool's
# 64 MiB, and prints the `run` call to make. .gpu/ is in .gitignore.
#
#   bash scripts/gpu_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda_env.sh
if [ ! -e "$CUDA_PATH/lib/libnvrtc.so.13" ]; then
    echo "gpu_build: NVRTC (libnvrtc.so.13) not found under $CUDA_PATH/lib: the executables would hold no kernels" >&2
    exit 1
fi

messages="$(mktemp)"
trap 'rm -f "$messages"' EXIT
echo "gpu_build: cargo build --release --bin effrank-engine"
cargo build --release --bin effrank-engine --message-format=json-render-diagnostics >>"$messages"
echo "gpu_build: cargo test --release --no-run --lib --test cuda_model --bench kernels --bench step"
cargo test --release --no-run --lib --test cuda_model --bench kernels --bench step --message-format=json-render-diagnostics >>"$messages"

rm -rf .gpu
mkdir -p .gpu
python3 - "$messages" <<'PY'
import json, shutil, subprocess, sys
# (target kind, target name, built as a test) -> name in .gpu/
wanted = {
    ("bin", "effrank-engine", False): "effrank-engine",
    ("lib", "effrank_engine", True): "lib_tests",
    ("test", "cuda_model", True): "cuda_model",
    ("bench", "kernels", True): "bench_kernels",
    ("bench", "step", True): "bench_step",
}
found = {}
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or "effrank-engine" not in m["package_id"]:
        continue
    t = m["target"]
    key = (t["kind"][0], t["name"].replace("-", "_") if t["kind"][0] == "lib" else t["name"], m["profile"]["test"])
    if key in wanted:
        found[wanted[key]] = m["executable"]
missing = sorted(set(wanted.values()) - set(found))
if missing:
    sys.exit(f"gpu_build: cargo named no executable for {missing}")
for name, exe in sorted(found.items()):
    subprocess.run(["objcopy", "--strip-debug", exe, f".gpu/{name}"], check=True)
    print(f"  .gpu/{name:<15} <- {exe}")
PY

limit=$((64 * 1024 * 1024))
gpu_bytes=$(du -cb .gpu/* | tail -1 | cut -f1)
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ { s += $1 } END { print s + 0 }')
echo "gpu_build: .gpu/ $((gpu_bytes / 1024 / 1024)) MiB + working tree $((tree_bytes / 1024 / 1024)) MiB (the device tool carries at most 64 MiB)"
if [ $((gpu_bytes + tree_bytes)) -ge "$limit" ]; then
    echo "gpu_build: too large for one device call" >&2
    exit 1
fi
cat <<'CALL'
gpu_build: ready. The device tool sends the checkout the session was started in (not a
helper's worktree): build there, or copy .gpu/ into it. Then call the tool's run with
  command:   bash scripts/gpu_session.sh all
  carry:     [".gpu"]
  timeout_s: 560
(all steps within 8 minutes of wall time; logs under $OUT, the raw logs to commit under bench/logs/).
CALL
