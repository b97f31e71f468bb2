#!/usr/bin/env bash
# The GPU check, in one run of at most 8 minutes (issue 13): build the extension with its CUDA
# kernels (and, alongside, the standalone kernels with CMake), the gpu-marked tests, every
# benchmark in --quick mode, the C++ kernel tests (ctest), and the sm_90 resources report (CPU
# only, in the background from the start). Every result is JSON (or JUnit XML) under $OUT, plus
# gpu_check.json: each step's exit code, seconds and log. Steps keep running when one fails; the
# exit code is 1 if any failed. Run from anywhere on a machine with a GPU, nvcc and torch:
#   OUT=/tmp/out bash kernels/tests/gpu_check.sh      # SAGAN_FAST_CUDA_ARCHS=9.0 by default
#   GPU_CHECK_BUDGET_S=470 (default): steps past the budget are cut (timeout) and say so.
#   GPU_CHECK_DRY_RUN=1: print the steps, run nothing (what CI checks without a GPU).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT="${OUT:-bench/results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export SAGAN_FAST_CUDA_ARCHS="${SAGAN_FAST_CUDA_ARCHS:-9.0}"
JOBS="$(nproc)"
export MAX_JOBS="${MAX_JOBS:-$(( JOBS > 2 ? JOBS / 2 : 1 ))}"   # half the cores: the CMake build runs alongside
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
arch="${SAGAN_FAST_CUDA_ARCHS//./}"
arch="${arch//;/ }"
start=$(date +%s)
steps=()      # "name rc seconds log" per step
failed=0

left() { echo $(( BUDGET - ($(date +%s) - start) )); }

# step NAME CAP_SECONDS COMMAND...: run with timeout min(CAP, what is left of the budget).
step() {
    local name="$1" cap="$2"
    shift 2
    local budget
    budget=$(left)
    (( budget < cap )) && cap=$budget
    local log="$OUT/$name.log" t0 rc
    t0=$(date +%s)
    if [[ "$DRY" != "0" ]]; then
        echo "[dry run] $name (timeout ${cap}s): $*"
        rc=0
    elif (( cap <= 0 )); then
        echo "skipped $name: the ${BUDGET}s budget is spent" | tee "$log"
        rc=124
    else
        echo "== $name (timeout ${cap}s)"
        timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
        rc=$?
        tail -n 5 "$log"
    fi
    local secs=$(( $(date +%s) - t0 ))
    (( rc == 124 || rc == 137 )) && echo "$name: cut at ${cap}s (budget)"
    (( rc != 0 )) && failed=1
    echo "$name: rc=$rc, ${secs}s"
    steps+=("$name $rc $secs $log")
}

# In the background from the start, each cut by `timeout` at the budget so that the waits below
# cannot run past it: the sm_90 resources of the Triton variants CI checks (CPU only, with this
# machine's Triton and ptxas: the GPU's own toolchain) and the CUDA kernels; the CMake build.
resources_cmd=(python bench/kernel_resources.py --ci --jobs "$MAX_JOBS" --json "$OUT/kernel_resources.json")
cmake_cmd=(bash -c "cmake -S . -B build/kernels-gpu -DCMAKE_CUDA_ARCHITECTURES='${arch}' \
-DCMAKE_BUILD_TYPE=Release && cmake --build build/kernels-gpu -j '$MAX_JOBS'")
if [[ "$DRY" == "0" ]]; then
    timeout --kill-after=10 "$BUDGET" "${resources_cmd[@]}" > "$OUT/kernel_resources.log" 2>&1 &
    resources_pid=$!
    timeout --kill-after=10 "$BUDGET" "${cmake_cmd[@]}" > "$OUT/cmake_build.log" 2>&1 &
    cmake_pid=$!
else
    echo "[dry run] background (timeout ${BUDGET}s): ${resources_cmd[*]}"
    echo "[dry run] background (timeout ${BUDGET}s): ${cmake_cmd[*]}"
fi

step build_extension 240 python -m pip install -q --no-build-isolation --no-deps -e .
step extension_has_cuda 30 python -c "import torch, sagan_fast._C as C; assert C.built_with_cuda(), 'sagan_fast._C has no CUDA'; print('sagan_fast._C with CUDA, torch', torch.__version__, torch.cuda.get_device_name())"
step pytest_gpu 150 python -m pytest -q -m gpu tests --junitxml="$OUT/pytest_gpu.xml"
step bench_attention 150 python bench/attention.py --quick --json "$OUT/attention.json"
step bench_spectral_norm 60 python bench/spectral_norm.py --quick --json "$OUT/spectral_norm.json"
if [[ "$DRY" == "0" ]]; then
    wait "$cmake_pid"
    cmake_rc=$?
    (( cmake_rc != 0 )) && { echo "cmake build failed (rc=$cmake_rc), see $OUT/cmake_build.log"; failed=1; }
    steps+=("cmake_build $cmake_rc 0 $OUT/cmake_build.log")
fi
step ctest 60 ctest --test-dir build/kernels-gpu --output-on-failure --output-junit "$OUT/ctest.xml"
step bench_train_step 240 python bench/train_step.py --quick --json "$OUT/train_step.json"
if [[ "$DRY" == "0" ]]; then
    wait "$resources_pid"
    resources_rc=$?
    (( resources_rc != 0 )) && failed=1
    steps+=("kernel_resources $resources_rc 0 $OUT/kernel_resources.log")
fi

total=$(( $(date +%s) - start ))
python - "$OUT/gpu_check.json" "$total" "${steps[@]}" <<'EOF'
import json, subprocess, sys
path, total, *steps = sys.argv[1:]
try:
    card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
except OSError:
    card = None
rows = []
for s in steps:
    name, rc, secs, log = s.split(" ", 3)
    rows.append(dict(step=name, rc=int(rc), seconds=int(secs), log=log))
json.dump(dict(card=card, total_seconds=int(total), steps=rows), open(path, "w"), indent=1)
print(f"wrote {path}")
EOF
echo "gpu check done in ${total} s (budget ${BUDGET} s); results in $OUT"
exit "$failed"
