# Sourced by .ci/run (under `set -euo pipefail`): installs NVRTC 13.0, the
# CUDA 13.0 headers and ptxas from the Python package index into a cache
# folder and exports the environment build.rs reads (scripts/cuda_env.sh;
# the `cargo test` that follows uses the same environment and does not
# rebuild), builds with every kernel required to compile, and prints
# ptxas's register and spill report for each kernel. Needs only Rust,
# python3 and pip; no GPU.
#
#   source scripts/ci_kernels.sh
#
# EFFRANK_CUDA_DIR overrides the cache folder (default ~/.cache/effrank-cu13).

source "$(dirname "${BASH_SOURCE[0]}")/cuda_env.sh"

echo "ci_kernels: cargo build (kernels required)"
# The build script's OUT_DIR (where the PTX is) comes from cargo's JSON messages.
ci_kernels_out="$(cargo build --message-format=json-render-diagnostics \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and "effrank-engine" in m.get("package_id", ""):
        print(m["out_dir"])')"

# The PTX target of build.rs (EFFRANK_CUDA_ARCH, default compute_90) as ptxas names it.
ci_kernels_sm="sm_${EFFRANK_CUDA_ARCH:-compute_90}"
ci_kernels_sm="${ci_kernels_sm/sm_compute_/sm_}"
echo "ci_kernels: ptxas -arch=$ci_kernels_sm -v on the embedded PTX"
if [ -z "$ci_kernels_out" ] || ! ls "$ci_kernels_out"/*.ptx >/dev/null 2>&1; then
    echo "ci_kernels: no PTX in the build script's output folder '$ci_kernels_out'" >&2
    return 1 2>/dev/null || exit 1
fi
for ci_kernels_ptx in "$ci_kernels_out"/*.ptx; do
    echo "-- $(basename "$ci_kernels_ptx")"
    "$CUDA_PATH/bin/ptxas" -arch="$ci_kernels_sm" -v "$ci_kernels_ptx" -o /dev/null 2>&1 \
        | awk '/Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
               /spill stores/ { spills = $0; sub(/.*info *: */, "", spills) }
               /Used [0-9]+ registers/ { regs = $0; sub(/.*info *: */, "", regs); printf "   %-28s %s; %s\n", name, regs, spills }'
done
unset ci_kernels_out ci_kernels_ptx
