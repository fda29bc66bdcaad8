# Sourced by scripts/ci_kernels.sh and scripts/gpu_build.sh: installs NVRTC
# 13.0, the CUDA 13.0 headers and ptxas from the Python package index into a
# cache folder (once), and exports the environment build.rs reads, with
# EFFRANK_REQUIRE_KERNELS=1 so that a build without NVRTC, or with a kernel
# that does not compile, fails. Needs python3 and pip; no GPU.
#
# EFFRANK_CUDA_DIR overrides the cache folder (default ~/.cache/effrank-cu13).

EFFRANK_CUDA_DIR="${EFFRANK_CUDA_DIR:-$HOME/.cache/effrank-cu13}"
if [ ! -x "$EFFRANK_CUDA_DIR/nvidia/cu13/bin/ptxas" ] || [ ! -e "$EFFRANK_CUDA_DIR/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    echo "cuda_env: installing NVRTC 13.0.88, CUDA runtime headers 13.0.96 and ptxas into $EFFRANK_CUDA_DIR"
    python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$EFFRANK_CUDA_DIR" \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvcc==13.0.88
fi
export CUDA_PATH="$EFFRANK_CUDA_DIR/nvidia/cu13"
export LD_LIBRARY_PATH="$CUDA_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EFFRANK_REQUIRE_KERNELS=1
