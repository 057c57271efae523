"""Small torch models for the torch capture and export tests, and ONNX Runtime as it runs the
QDQ graph as written.

``Block``: a transformer block (LayerNorm, q/k/v/o Linear attention, GELU MLP) on ``[b, t, 32]``;
``CNN``: Conv2d -> (BatchNorm2d) -> ReLU -> ConvTranspose2d -> ReLU -> Linear head on
``[b, 3, 8, 8]``. Weights and inputs are seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

BLOCK_MODULES = {"q", "k", "v", "o", "fc1", "fc2"}
CNN_MODULES = {"conv", "up", "head"}


class Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (
            m(y).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.o((weights @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class CNN(nn.Module):
    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.up(h)).flatten(1))


def make_block() -> tuple[Block, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Block().eval(), [torch.randn(2, 5, 32) for _ in range(3)]


def make_cnn(batch_norm: bool = False) -> tuple[CNN, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = CNN(batch_norm).eval()
    if batch_norm:
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    return model, [torch.randn(2, 3, 8, 8) for _ in range(3)]


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    """The model's output in ORT with graph optimizations off: the QDQ arithmetic as written.

    Already at ORT_ENABLE_BASIC, ORT rewrites it: a Conv's float bias behind dequantized
    inputs is quantized to int32 with scale ``s_x * s_w`` (2e-5 off at the Conv output here),
    enough to move an activation across a rounding boundary of the next quantizer.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_block_export_matches_fake_quant(calibration, model: nn.Module, batches, path: Path):
    """The block model's calibration exported to ``path`` (every block module mapped, validated
    over the FP4 emulation) computes in the ONNX reference evaluator what ``fake_quantize()``
    computes in torch, on the batches after the first (the export's sample), to 16 float32
    ulps of the output's magnitude."""
    result = calibration.export_onnx((batches[0],), path, dynamo=False)
    assert set(result.mapped) == BLOCK_MODULES
    assert result.report["validator"] == "onnxruntime (CPUExecutionProvider, fp4 emulation)"
    proto = onnx.load(str(path))
    evaluator = ReferenceEvaluator(proto)
    eps = float(np.finfo(np.float32).eps)
    for x in batches[1:]:
        (got,) = evaluator.run(None, {proto.graph.input[0].name: x.numpy()})
        with torch.no_grad(), calibration.fake_quantize():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=16 * eps * float(np.abs(want).max()))
