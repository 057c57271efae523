#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks behind README's GPU tables, on a machine with a CUDA GPU,
# Triton and (for the capture step) onnxruntime-gpu:
#     bash benchmarks/run_gpu.sh [tests] [nvfp4] [mse] [histogram] [capture]   (default: all)
# Tables go to $OUT when it is set, else benchmarks/results; each step's log beside them.
# Every step runs (under STEP_TIMEOUT seconds, default 900); the exit status is 1 if one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {
    local name=$1
    shift
    echo "== $name: $*"
    timeout "${STEP_TIMEOUT:-900}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    if [ "$rc" != 0 ]; then
        echo "== $name failed (exit $rc)"
        status=1
    fi
}
for name in "${@:-tests nvfp4 mse histogram capture}"; do
    for one in $name; do
        case $one in
        tests) step cuda_tests python3 -m pytest -q -m cuda -p no:cacheprovider tests ;;
        nvfp4) step bench_nvfp4 python3 benchmarks/bench_nvfp4_kernel.py ;;
        mse) step bench_mse python3 benchmarks/bench_mse_kernel.py ;;
        histogram) step bench_histogram python3 benchmarks/bench_histogram_kernel.py ;;
        capture) step bench_capture python3 benchmarks/bench_capture_throughput.py \
            --provider cuda --repeats 3 ;;
        *) echo "unknown step $one: tests nvfp4 mse histogram capture" >&2 && exit 2 ;;
        esac
    done
done
exit $status
