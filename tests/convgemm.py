"""The small Conv + Gemm model that test_cli.py and pipeline/test_pipeline.py calibrate end to end.

The model is a torch ``Conv2d(3, 4, 3) -> ReLU -> Flatten -> Linear(144, 5)`` exported with the
TorchScript exporter at opset 17 (dynamic batch); the data is a directory of .npz batches. The
``workdir`` fixture (tests/conftest.py) makes one such directory per test module.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

BATCHES = 4
BATCH = 6
CPU = ["CPUExecutionProvider"]
ACTIVATIONS = {"x", "/Flatten_output_0"}
WEIGHTS = {"conv.weight", "fc.weight"}


class ConvGemm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def make_workdir(root: Path) -> Path:
    """model.onnx (float, opset 17) and data/ (4 .npz batches of 6) in ``root``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ConvGemm().eval(),
            (torch.randn(2, 3, 8, 8),),
            str(root / "model.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(BATCHES):
        x = rng.standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
        np.savez(root / "data" / f"batch_{i:02d}.npz", x=x)
    return root


def data_batches(workdir: Path) -> list[np.ndarray]:
    return [np.load(p)["x"] for p in sorted((workdir / "data").glob("*.npz"))]


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=CPU)
    return session.run(["y"], {"x": x})[0]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
