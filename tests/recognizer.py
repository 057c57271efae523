"""A small text recognizer with the activations that break KL calibration: a conv stem (one-sided
post-ReLU inputs), sharp self-attention (softmax weights in [0, 1], most near 0, into a MatMul), a
sigmoid gate and a heavy-tailed GELU MLP, then per-step character logits.

``make_recognizer(root)`` writes recognizer.onnx (input ``image`` ``[b, 1, 16, 64]``, output
``logits`` ``[b, 32, 40]``) and data/ (8 .npz batches of 4 seeded stroke images) under ``root``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCHES = 8
CLASSES = 40


class Recognizer(nn.Module):
    def __init__(self, dim: int = 64, sharpness: float = 24.0):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, stride=(2, 2), padding=1)
        self.embed = nn.Linear(32, dim)
        self.q, self.k, self.v, self.gate = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, CLASSES)
        self.position = nn.Parameter(torch.randn(32, dim))
        self.sharpness = sharpness

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.stem(image)))).mean(dim=2).transpose(1, 2)
        x = self.embed(h) + self.position
        q, k = (
            nn.functional.normalize(self.q(x), dim=-1),
            nn.functional.normalize(self.k(x), dim=-1),
        )
        weights = torch.softmax(self.sharpness * q @ k.transpose(-1, -2), dim=-1)
        x = (weights @ self.v(x)) * torch.sigmoid(self.gate(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x)


def images(rng: np.random.Generator, count: int) -> np.ndarray:
    """Dark strokes on a light background, ``[count, 1, 16, 64]`` float32 in [0, 1]."""
    out = np.full((count, 1, 16, 64), 0.9, np.float32)
    for image in out:
        for start in rng.integers(0, 60, size=8):
            width = int(rng.integers(1, 4))
            image[0, rng.integers(2, 6) : rng.integers(10, 15), start : start + width] = 0.1
    return out + rng.normal(0, 0.02, out.shape).astype(np.float32)


def make_recognizer(root: Path) -> Path:
    """recognizer.onnx (opset 17) and data/ under ``root``; returns ``root``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Recognizer().eval(),
            (torch.rand(2, 1, 16, 64),),
            str(root / "recognizer.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}},
        )
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for i in range(BATCHES):
        np.savez(root / "data" / f"batch_{i}.npz", image=images(rng, 4))
    return root
