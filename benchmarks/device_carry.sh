#!/usr/bin/env bash
# onnxruntime-gpu and the demo model onto a lent GPU machine that cannot download, in parts small
# enough for its tool's 64 MiB working tree, then unpacked there for run_gpu.sh.
#
#   here:  bash benchmarks/device_carry.sh pack        (.dev/p1 .. .dev/pN and .dev/common)
#   there: one call per part but the last, back to back (the machine stays warm for seconds):
#            mkdir -p /tmp/stash && cp .dev/pK/* /tmp/stash/          carrying .dev/pK
#          then one call carrying .dev/pN and .dev/common:
#            bash benchmarks/device_carry.sh unpack && source /tmp/qcal-env.sh &&
#            bash benchmarks/run_gpu.sh auto
#
# pack: the onnxruntime-gpu wheel for the machine's Python (ORT_GPU, default 1.31.1; cp312)
# without its TensorRT provider, and the demo model as this machine exported it, both
# zstd-compressed into one stream cut in PART_BYTES parts; .dev/common holds zstd and its
# libraries, the pure-Python wheels the package needs beyond that machine's image, and the
# demo's tokenized batches (no tokenizer there). unpack: onnxruntime-gpu and those wheels in
# /tmp/site, the demo model in /tmp/qcal-cache, and /tmp/qcal-env.sh, which sets PYTHONPATH,
# LD_LIBRARY_PATH (the CUDA libraries of torch's wheels), QCAL_CACHE_DIR and AUTO_ARGS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dev=.dev
case ${1:-} in
pack)
    grep -qx "/$dev/" .git/info/exclude 2>/dev/null || echo "/$dev/" >>.git/info/exclude
    rm -rf "$dev" && mkdir -p "$dev/common/libs" "$dev/common/whl" /tmp/qcal-carry
    work=/tmp/qcal-carry
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$work" "onnxruntime-gpu==${ORT_GPU:-1.31.1}"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$dev/common/whl" \
        rich markdown-it-py mdurl pygments
    rm -rf "$work/site" && mkdir "$work/site"
    unzip -q "$work"/onnxruntime_gpu-*.whl -d "$work/site"
    rm -f "$work"/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
    model=$(python3 -c "from qcal_export.demo.model import demo_model_path; print(demo_model_path())")
    tar cf - -C "$work/site" . | zstd -19 -T0 -q -f -o "$work/ort.tar.zst"
    zstd -19 -T0 -q -f "$model" -o "$work/demo.onnx.zst"
    stat -c %s "$work/ort.tar.zst" >"$dev/common/ort_bytes"
    cat "$work/ort.tar.zst" "$work/demo.onnx.zst" | split -b "${PART_BYTES:-60000000}" -d -a 2 - "$work/part"
    k=0
    for part in "$work"/part*; do
        k=$((k + 1)) && mkdir -p "$dev/p$k" && mv "$part" "$dev/p$k/"
    done
    cp "$(command -v zstd)" "$dev/common/"
    for lib in liblz4.so.1 liblzma.so.5 libz.so.1; do
        cp "$(ldconfig -p | awk -v l="$lib" '$1 == l && !found {print $NF; found = 1}')" "$dev/common/libs/"
    done
    python3 benchmarks/bench_accuracy_steps.py --save-inputs "$dev/common/inputs"
    echo "packed $k parts: carry .dev/p1 .. .dev/p$k one call each, .dev/common with the last"
    ;;
unpack)
    mkdir -p /tmp/stash /tmp/site /tmp/qcal-cache
    cp "$dev"/p*/part* /tmp/stash/
    common=$PWD/$dev/common
    export LD_LIBRARY_PATH=$common/libs:${LD_LIBRARY_PATH:-}
    cat /tmp/stash/part* >/tmp/qcal-carry.bin
    ort_bytes=$(cat "$common/ort_bytes")
    head -c "$ort_bytes" /tmp/qcal-carry.bin | "$common/zstd" -d -q | tar x -C /tmp/site
    tail -c +$((ort_bytes + 1)) /tmp/qcal-carry.bin | "$common/zstd" -d -q -f \
        -o /tmp/qcal-cache/all-minilm-l6-v2-sentence-embedding-v1.onnx
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        "$common"/whl/*.whl
    nvidia=$(python3 -c "import glob, os, torch; print(':'.join(glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'lib'))))")
    cat >/tmp/qcal-env.sh <<ENV
export LD_LIBRARY_PATH=$nvidia:$LD_LIBRARY_PATH
export QCAL_CACHE_DIR=/tmp/qcal-cache PYTHONPATH=$PWD:/tmp/site
export AUTO_ARGS="--inputs $common/inputs"
ENV
    # shellcheck disable=SC1091  # written just above
    source /tmp/qcal-env.sh
    python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    ;;
*) echo "usage: device_carry.sh pack | unpack" >&2 && exit 2 ;;
esac
