"""The demo model: all-MiniLM-L6-v2 exported to ONNX (sentence embeddings), cached."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.demo.evaluate import session
from qcal_export.demo.texts import bundled_model_dir, demo_batches
from qcal_export.errors import ModelError

logger = logging.getLogger(__name__)

MODEL_FILE_NAME = "all-minilm-l6-v2-sentence-embedding-v1.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
EMBEDDING_DIM = 384
EXPORT_TOLERANCE = 1e-4

# Fixed sentences of different lengths, so the export check also exercises padding.
_CHECK_TEXTS = (
    "Quantization maps floating point values to a small set of integers.",
    "A short one.",
    "Calibration runs representative data through the model and records the range of every "
    "activation, so that the scale chosen for each tensor neither clips often nor wastes "
    "resolution on values that never occur.",
)


def default_cache_dir() -> Path:
    """``$QCAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcal_export``, else ``~/.cache/qcal_export``."""
    explicit = os.environ.get("QCAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qcal_export"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading progress bar; restore the previous setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def sentence_encoder(model_dir: Path | None = None) -> Any:
    """The pretrained BERT plus mean pooling and L2 normalization, as one eval-mode module
    (the bundled all-MiniLM-L6-v2 unless ``model_dir`` names another).

    forward(input_ids [B, S], attention_mask [B, S], token_type_ids [B, S]) -> [B, 384] float32.
    """
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        """sentence-transformers' mean pooling over the attention mask, then L2 normalization."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    model_dir = bundled_model_dir() if model_dir is None else model_dir
    with _quiet_transformers():
        # Eager attention exports to plain MatMul/Softmax (SDPA adds IsNaN/Where guards).
        bert = AutoModel.from_pretrained(
            str(model_dir),
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation="eager",
        )
    return SentenceEncoder(bert).eval()


def _export_onnx(module: Any, sample: dict[str, np.ndarray], path: Path) -> None:
    """Export with the TorchScript exporter (opset 17); fall back to the dynamo exporter."""
    import torch

    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    common = {
        "input_names": list(INPUT_NAMES),
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": dynamic_axes,
        "opset_version": 17,
    }
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer and legacy-exporter warnings are expected here; the result is checked below.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **common)
        except Exception as exc:  # any exporter failure: try the other exporter once
            logger.warning("TorchScript ONNX export failed (%s); retrying with dynamo=True", exc)
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, **common)


def _fix_output_shape(path: Path) -> None:
    """Give the output its static width: ``sentence_embedding`` is [batch, 384]; check the graph."""
    import onnx

    model = onnx.load(str(path))
    output = next((o for o in model.graph.output if o.name == OUTPUT_NAME), None)
    if output is None:
        raise ModelError(f"exported model {path} has no output named {OUTPUT_NAME!r}")
    dims = output.type.tensor_type.shape.dim
    del dims[:]
    dims.add().dim_param = "batch"
    dims.add().dim_value = EMBEDDING_DIM
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _verify_export(module: Any, path: Path) -> float:
    """Max abs difference of ONNX Runtime vs torch on a small padded batch; raise if > 1e-4."""
    import torch

    (batch,) = demo_batches(list(_CHECK_TEXTS), batch_size=len(_CHECK_TEXTS))
    with torch.no_grad():
        expected = module(*(torch.from_numpy(batch[name]) for name in INPUT_NAMES)).numpy()
    (got,) = session(path, cpu_only=True).run([OUTPUT_NAME], batch)
    diff = float(np.max(np.abs(got - expected)))
    if got.shape != expected.shape or not diff < EXPORT_TOLERANCE:
        raise ModelError(
            f"exported model {path} disagrees with torch: output {got.shape} vs {expected.shape}, "
            f"max abs diff {diff:.3g} (tolerance {EXPORT_TOLERANCE}); delete it and check the "
            "torch/transformers/onnxruntime versions"
        )
    return diff


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of all-MiniLM-L6-v2 as ONNX, exported and verified on first use, then cached.

    Opset 17 from the TorchScript exporter (18 if only the dynamo exporter succeeds).

    Inputs: int64 input_ids, attention_mask, token_type_ids [batch, seq]; output float32
    ``sentence_embedding`` [batch, 384] (masked mean pooling, then L2 normalization, in the graph).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / MODEL_FILE_NAME
    if path.is_file():
        logger.debug("demo model: reusing %s", path)
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the demo cache directory {cache}: {exc}") from exc

    model_dir = bundled_model_dir()
    logger.info("demo model: exporting all-MiniLM-L6-v2 from %s to %s", model_dir, path)
    start = time.perf_counter()
    module = sentence_encoder(model_dir)
    # The sample must contain padding: a mask of all ones could be traced away as a constant.
    (sample,) = demo_batches(list(_CHECK_TEXTS[:2]), batch_size=2)
    tmp = cache / f".{MODEL_FILE_NAME}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        _export_onnx(module, sample, tmp)
        _fix_output_shape(tmp)
        diff = _verify_export(module, tmp)
        os.replace(tmp, path)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"exporting the demo model to {path} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    logger.info(
        "demo model: exported in %.1f s, ONNX Runtime vs torch max abs diff %.2g",
        time.perf_counter() - start,
        diff,
    )
    return path
