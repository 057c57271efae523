"""What each placement target buys where the model is deployed: the kernels ONNX Runtime runs for
the QDQ model, its latency against the float model's and the file sizes, on the CPU EP and
(where onnxruntime-gpu sees a GPU) the CUDA EP.

Two models with seeded random weights, exported by torch here (no download): a ResNet-style CNN
(conv-bn-relu blocks with residual Adds, max and global average pooling, a Gemm head) and a
BERT encoder of MiniLM's shape from a ``transformers`` config. Each is calibrated with
``--target tensorrt`` and ``--target ort`` (int8 weights per channel; activations int8 and
uint8) and the report's ``deployment`` section (median latency of 5 runs of one batch,
profiler kernels) is tabulated. Random weights make accuracy meaningless here; the output
cosine is shown only as a check that the model computes what the float one does. Not a test:

    python benchmarks/bench_deployment.py [--providers cpu cuda] [--out DIR]

The table is printed and written to ``benchmarks/results/deployment_<provider>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
from pathlib import Path

import harness
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from qcal_export.pipeline.calibrate import calibrate_onnx

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (("tensorrt", "int8"), ("ort", "int8"), ("ort", "uint8"))


class Block(nn.Module):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.skip = nn.Sequential()
        if stride != 1:
            self.skip = nn.Sequential(
                nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def resnet() -> nn.Module:
    """ResNet-18's stem and stages (64-512 channels, two blocks each), random weights."""
    stages = [Block(64, 1), Block(64, 1)]
    for channels in (64, 128, 256):
        stages += [Block(channels, 2), Block(channels * 2, 1)]
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000),
    )  # fmt: skip


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, attn_implementation="eager",
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


class LastHidden(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export(name: str, folder: Path, batch: int) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """The model exported to ONNX (opset 17) and 8 calibration batches of ``batch`` samples."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    path = folder / f"{name}.onnx"
    if name == "resnet":
        module, names = resnet().eval(), ["image"]
        batches = [
            {"image": rng.standard_normal((batch, 3, 224, 224), np.float32)} for _ in range(8)
        ]
    else:
        module, names = LastHidden(bert()).eval(), ["input_ids", "attention_mask"]
        batches = [
            {
                "input_ids": rng.integers(1000, 30000, (batch, 128), dtype=np.int64),
                "attention_mask": np.ones((batch, 128), np.int64),
            }
            for _ in range(8)
        ]
    args = tuple(torch.from_numpy(batches[0][n]) for n in names)
    axes = {n: {0: "batch"} for n in names}
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=names,
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    return path, batches


def row(
    model: str, path: Path, batches: list, target: str, activations: str, provider: str, out: Path
) -> str:
    result = calibrate_onnx(
        path, batches, output=out / f"{model}.{target}.{activations}.onnx", provider=provider,
        format="int8", activation_format=activations, target=target, validate_batches=2,
    )  # fmt: skip
    deployment = result.report["deployment"]
    floating, quantized = deployment["float"], deployment["quantized"]
    cosine = result.report["verdict"]["cosine"]
    kernels = ", ".join(f"{k} {n}" for k, n in deployment["integer_kernels"].items()) or "none"
    return (
        f"| {model} | {target} | {activations} | {floating['latency_ms']:.2f} | "
        f"{quantized['latency_ms']:.2f} | {floating['latency_ms'] / quantized['latency_ms']:.2f} | "
        f"{floating['file_bytes'] / 2**20:.1f} | {quantized['file_bytes'] / 2**20:.1f} | "
        f"{cosine:.4f} | {kernels} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)))
    parser.add_argument("--models", nargs="+", default=["resnet", "bert"])
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    available = ort.get_available_providers()
    with tempfile.TemporaryDirectory(prefix="qcal-deploy-") as tmp:
        folder = Path(tmp)
        exported = {name: export(name, folder, opts.batch) for name in opts.models}
        for provider in opts.providers:
            if provider == "cuda" and "CUDAExecutionProvider" not in available:
                print(f"skipped cuda: onnxruntime {ort.__version__} has {available}")
                continue
            lines = [
                f"# Deployment: kernels, latency and size per placement target ({provider} EP)",
                "",
                f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
                f"- versions: {harness.versions()}",
                f"- batch {opts.batch} (resnet 3x224x224; bert 128 tokens); median of 5 runs",
                "",
                "| model | target | activations | float ms | quantized ms | speed-up | float MiB | "
                "quantized MiB | output cosine | integer kernels (ORT profiler) |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
            ]
            for name, (path, batches) in exported.items():
                for target, activations in ROWS:
                    lines.append(row(name, path, batches, target, activations, provider, folder))
                    print(lines[-1], flush=True)
            table = "\n".join(lines) + "\n"
            (opts.out / f"deployment_{provider}.md").write_text(table)
            print(table)


if __name__ == "__main__":
    main()
