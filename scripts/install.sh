#!/usr/bin/env bash
# Set up qcal-export on this machine: a CPU build of torch where there is no GPU, and the
# ONNX Runtime build that fits (onnxruntime-gpu with the CUDA EP where a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    ort_extra=gpu
    torch_spec="torch"
else
    ort_extra=cpu
    # A CPU-only wheel of torch; the local file is used where the machine ships one.
    torch_spec="torch==2.13.0"
    if ! python3 -c "import torch" 2>/dev/null; then
        $PIP "$torch_spec" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || $PIP "$torch_spec"
    fi
fi
$PIP "$torch_spec" -e ".[${ort_extra},demo,test]"
