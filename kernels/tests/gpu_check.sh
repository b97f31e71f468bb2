#!/usr/bin/env bash
# The CUDA backend's GPU check, in one run (issue #5): build the extension with its CUDA kernels,
# build and ctest the standalone kernels, run the gpu-marked tests of the extension, then both
# benchmarks in --quick mode. Run from the repository root on a machine with a GPU and nvcc.
#   bash kernels/tests/gpu_check.sh            # SAGAN_FAST_CUDA_ARCHS=9.0 by default (one arch: faster build)
set -euo pipefail
cd "$(dirname "$0")/../.."
export SAGAN_FAST_CUDA_ARCHS="${SAGAN_FAST_CUDA_ARCHS:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
arch="${SAGAN_FAST_CUDA_ARCHS//./}"; arch="${arch//;/ }"

t0=$(date +%s)
python -m pip install -q --no-build-isolation --no-deps -e .
t1=$(date +%s)
echo "extension build: $((t1 - t0)) s"
python -c "import torch, sagan_fast._C as C; assert C.built_with_cuda(), 'sagan_fast._C has no CUDA'; print('sagan_fast._C with CUDA, torch', torch.__version__)"

cmake -S . -B build/kernels-gpu -DCMAKE_CUDA_ARCHITECTURES="${arch}" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/kernels-gpu -j "${MAX_JOBS}"
echo "cmake build: $(( $(date +%s) - t1 )) s"
ctest --test-dir build/kernels-gpu --output-on-failure

python -m pytest -q -m gpu tests/test_cuda_extension.py
for bench in bench/attention.py bench/spectral_norm.py; do
    if [ -f "$bench" ]; then python "$bench" --quick; fi
done
echo "gpu check done in $(( $(date +%s) - t0 )) s"
