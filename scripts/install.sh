#!/usr/bin/env bash
# Set up qcal-export here: ONNX Runtime with the CUDA EP (onnxruntime-gpu) where a GPU is
# present, the CPU build where not; a CPU torch where no GPU needs a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { python3 -m pip install -q --disable-pip-version-check "$@"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install -e ".[gpu,demo,export,report,test,peers]"
else
    # torch 2.13.0 is the CPU build these machines keep as a local wheel (pip's find-links);
    # elsewhere set QCAL_TORCH to a CPU wheel or index, e.g. "torch --index-url .../whl/cpu".
    python3 -c "import torch" 2>/dev/null || pip_install ${QCAL_TORCH:-torch==2.13.0}
    pip_install -e ".[cpu,demo,export,report,test,peers]"
fi
