"""A decoder-only LLM of the Llama architecture with seeded random weights, exported to ONNX.

The benchmark and test model for calibration at LLM scale without a download: a transformers
``LlamaConfig`` per size name (``tiny`` for tests, ``small`` ~100M, ``1b`` ~1B parameters),
random weights from a fixed seed, exported without KV cache (input_ids, attention_mask ->
logits) with dynamic batch and sequence and its weights in one external data file, checked
against torch's logits in ONNX Runtime; plus seeded calibration batches of token ids (.npz).

    python benchmarks/llm_model.py --size tiny --out DIR [--dtype float16] [--batches 4]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
OPSET = 17
SEED = 0
MODEL_NAME = "model.onnx"
DATA_DIR = "data"
# Max abs logit difference ORT vs torch; fp16 rounds every activation, hence the looser bound.
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}

# name -> LlamaConfig fields: tiny for tests (seconds on 2 cores), the rest for benchmarks.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    ),
    "small": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}


def llama_config(size: str) -> Any:
    """The transformers LlamaConfig of a size name (see ``SIZES``): eager attention, no cache,
    untied embeddings (so the LM head is a MatMul weight of its own)."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    return LlamaConfig(
        **SIZES[size],
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="eager",
    )


def parameter_count(size: str) -> int:
    """Parameters of a size from its config alone (no model built): embeddings, layers, head."""
    c = SIZES[size]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * per_layer + 2 * c["vocab_size"] * h + h


def llama_module(size: str) -> Any:
    """The eval-mode module forward(input_ids [B, S] int64, attention_mask [B, S] int64) ->
    logits [B, S, vocab] float32, weights drawn from ``SEED``."""
    import torch
    from transformers import LlamaForCausalLM

    class Logits(LlamaForCausalLM):
        """LlamaForCausalLM's logits alone, so that the export has one output; the module
        names stay transformers' own (``model.layers.0.self_attn.q_proj``, ``lm_head``)."""

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return (
                super()
                .forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                .logits
            )

    torch.manual_seed(SEED)
    return Logits(llama_config(size)).eval()


def calibration_batches(
    size: str, count: int = 4, batch: int = 2, seq: int = 16, seed: int = SEED
) -> list[dict[str, np.ndarray]]:
    """``count`` seeded batches of random token ids in the size's vocabulary; the second half of
    every other batch's last row is padding (mask 0), so masking is exercised.

    Each batch: int64 input_ids and attention_mask [batch, seq].
    """
    rng = np.random.default_rng(seed)
    vocab = SIZES[size]["vocab_size"]
    batches = []
    for i in range(count):
        ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        if i % 2 and batch > 1:
            mask[-1, seq // 2 :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _export(module: Any, sample: dict[str, np.ndarray], path: Path) -> None:
    """Export with the TorchScript exporter; fall back to the dynamo exporter if it fails."""
    import torch

    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    common = {
        "input_names": list(INPUT_NAMES),
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": axes,
        "opset_version": OPSET,
    }
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings are expected; the export is checked against torch afterwards.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **common)
        except Exception as exc:  # any exporter failure: try the other exporter once
            logger.warning("TorchScript ONNX export failed (%s); retrying with dynamo=True", exc)
            torch.onnx.export(module, args, str(path), dynamo=True, **common)


def _save_external(raw: Path, path: Path) -> None:
    """Re-save the exported model with every weight in one external data file beside it."""
    import onnx

    model = onnx.load(str(raw))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    onnx.checker.check_model(str(path))


def check_export(module: Any, path: Path, batch: dict[str, np.ndarray], dtype: str) -> float:
    """Max abs difference of ORT's logits vs torch's (float32) on ``batch``; raise if it is
    above ``TOLERANCE[dtype]``."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        want = module(*(torch.from_numpy(batch[n]) for n in INPUT_NAMES)).float().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], batch)
    diff = float(np.max(np.abs(got.astype(np.float32) - want)))
    if got.shape != want.shape or not diff <= TOLERANCE[dtype]:
        raise RuntimeError(
            f"{path}: ORT's logits {got.shape} disagree with torch's {want.shape}: max abs "
            f"diff {diff:.3g} (tolerance {TOLERANCE[dtype]})"
        )
    return diff


def build(
    size: str, folder: str | Path, dtype: str = "float32", batches: int = 4, seq: int = 16
) -> Path:
    """Export the ``size`` model to ``folder/model.onnx`` (+ ``model.onnx.data``) and write
    ``batches`` calibration batches to ``folder/data/batch_NNN.npz``; the model's path.

    ``dtype``: float32 or float16 weights and activations (token ids stay int64).
    """
    import torch

    if dtype not in TOLERANCE:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(TOLERANCE)}")
    out = Path(folder)
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    module = llama_module(size)
    data = calibration_batches(size, count=batches, seq=seq)
    # A batch with padding, so that the mask cannot be traced away as a constant.
    sample = calibration_batches(size, count=2, seq=seq, seed=SEED + 1)[1]
    path = out / MODEL_NAME
    export_module = module.to(torch.float16) if dtype == "float16" else module
    # Past 2 GB the exporter writes one file per weight: export into a folder removed after.
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as raw:
        _export(export_module, sample, Path(raw) / MODEL_NAME)
        _save_external(Path(raw) / MODEL_NAME, path)
    # The reference: the exported weights (fp16-rounded if asked) in float32 arithmetic.
    diff = check_export(module.float(), path, sample, dtype)
    for i, batch in enumerate(data):
        np.savez(out / DATA_DIR / f"batch_{i:03d}.npz", **batch)
    logger.info("%s (%s, %s): ORT vs torch max abs diff %.3g", path, size, dtype, diff)
    return path


def main(argv: list[str] | None = None) -> None:
    """The command line: build one size into a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%s: about %.1fM parameters", args.size, parameter_count(args.size) / 1e6)
    build(args.size, args.out, args.dtype, args.batches, args.seq)


if __name__ == "__main__":
    main()
