#!/usr/bin/env bash
# The CUDA tests and the GPU benchmarks behind README's GPU tables, on a machine with a CUDA GPU,
# Triton and (for the capture step) onnxruntime-gpu:
#     bash benchmarks/run_gpu.sh [tests] [nvfp4] [mse] [histogram] [capture]   (default: these)
#     bash benchmarks/run_gpu.sh llm            (the ~1B LLM, ours vs ORT: one call at a time)
#     bash benchmarks/run_gpu.sh distributed    (needs 2 GPUs: 1 vs 2 processes, NCCL)
#     bash benchmarks/run_gpu.sh auto           (method auto against max on the demo, CUDA EP,
#                                                and a profile of a fifth row, auto; AUTO_ARGS=
#                                                "--inputs DIR": batches saved with
#                                                bench_accuracy_steps.py --save-inputs DIR)
#     bash benchmarks/run_gpu.sh auto_cpu       (the same on the CPU EP: host workers 1, as before
#                                                they ran side by side, then one per core,
#                                                profiled; AUTO_ARGS as for auto)
#     BEFORE=DIR bash benchmarks/run_gpu.sh auto_ab  (max and auto, the code in DIR (a checkout:
#                                                its qcal_export and benchmarks) against this
#                                                one, processes alternating: two pairs on the
#                                                CUDA EP, one on the CPU EP; AUTO_ARGS as above)
# Tables go to $OUT when it is set, else benchmarks/results; each step's log beside them.
# Every step runs (under STEP_TIMEOUT seconds, default 900); the exit status is 1 if one failed.
# llm fits a 10-minute command: its step stops at LLM_STEP_TIMEOUT (default 570 s) and the
# script itself starts no row past its budget (30 s less). Call 1 exports the model (and stops:
# the export needs most of a call), calls 2.. measure the rows left until the log says
# "all rows done"; the rows measured stay in $OUT/llm_gpu.json. LLM_ARGS adds options (e.g.
# LLM_ARGS="--rows ours-max,ort-minmax --torch-profile"); the model is kept in
# QCAL_LLM_WORK (default /tmp/qcal-llm) between calls on the same machine.
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
        llm)
            limit=${LLM_STEP_TIMEOUT:-570}
            # shellcheck disable=SC2086  # LLM_ARGS is a list of options
            STEP_TIMEOUT=$limit step bench_llm python3 benchmarks/bench_llm_gpu.py \
                --budget-s $((limit - 30)) --row-timeout $((limit - 30)) ${LLM_ARGS:-}
            ;;
        distributed) step bench_distributed python3 benchmarks/bench_distributed.py \
            --provider cuda --nproc 1 2 ;;
        # shellcheck disable=SC2086  # AUTO_ARGS is a list of options
        auto) step bench_auto python3 benchmarks/bench_accuracy_steps.py \
            --rows max auto max auto auto --output "$out/accuracy_steps_auto_cuda.md" \
            --profile "$out/accuracy_steps_auto_cuda_profile.txt" ${AUTO_ARGS:-} ;;
        # shellcheck disable=SC2086  # AUTO_ARGS is a list of options
        auto_cpu)
            step bench_auto_cpu_one python3 benchmarks/bench_accuracy_steps.py --provider cpu \
                --host-workers 1 --rows max auto max auto \
                --output "$out/accuracy_steps_auto_cpu_one_worker.md" ${AUTO_ARGS:-}
            step bench_auto_cpu python3 benchmarks/bench_accuracy_steps.py --provider cpu \
                --rows max auto max auto --output "$out/accuracy_steps_auto_cpu.md" \
                --profile "$out/accuracy_steps_auto_cpu_profile.txt" ${AUTO_ARGS:-}
            ;;
        auto_ab)
            for run in cuda_1 cuda_2 cpu_1; do
                for code in before after; do
                    root=$PWD && [ "$code" = before ] && root=${BEFORE:?BEFORE=DIR is needed}
                    # shellcheck disable=SC2086  # AUTO_ARGS is a list of options
                    PYTHONPATH=$root:${PYTHONPATH:-} step "auto_ab_${code}_$run" python3 \
                        "$root/benchmarks/bench_accuracy_steps.py" --provider "${run%_*}" \
                        --rows max auto max auto --output "$out/auto_ab_${code}_$run.md" \
                        ${AUTO_ARGS:-}
                done
            done
            ;;
        *) echo "unknown step $one: tests nvfp4 mse histogram capture llm distributed auto auto_cpu auto_ab" >&2 && exit 2 ;;
        esac
    done
done
exit $status
