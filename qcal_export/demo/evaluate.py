"""Demo accuracy: cosine of float vs quantized sentence embeddings."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.errors import DataError, ModelError

logger = logging.getLogger(__name__)

OUTPUT_NAME = "sentence_embedding"


def session(path: str | Path, cpu_only: bool = False) -> Any:
    """An ONNX Runtime session on CUDA when that provider is available, else on the CPU."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if not cpu_only and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc


class _Embedder:
    """Runs one model on batches with validation's reference runner (ONNX Runtime; for NVFP4
    its FP4 emulation). The output is ``sentence_embedding`` if present, else the first."""

    def __init__(self, path: str | Path):
        import onnx

        from qcal_export.validation.validate import reference_runner

        model = onnx.load(str(path))
        self.inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        self.output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        self.runner, self.validator = reference_runner(model, _providers())

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """One batch's embeddings, ``[B, D]`` float64."""
        (embedding,) = self.runner.run([self.output], {name: batch[name] for name in self.inputs})
        return np.asarray(embedding, dtype=np.float64)


def _providers() -> list[str]:
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def embedding_cosine(
    reference_model: str | Path,
    candidate_model: str | Path,
    batches: Iterable[dict[str, np.ndarray]],
) -> dict[str, float | int]:
    """Per-sentence cosine similarity of two models' sentence embeddings, over all batches.

    Each batch feeds both models ([B, seq] int64 arrays); returns {"mean", "min", "count"}.
    NVFP4 models run in ONNX Runtime over their exact FP4 emulation (validation's runner).
    """
    reference = _Embedder(reference_model)
    candidate = _Embedder(candidate_model)
    cosines: list[np.ndarray] = []
    for batch in batches:
        try:
            ref, cand = reference(batch), candidate(batch)
        except KeyError as exc:
            raise DataError(f"embedding_cosine: a batch lacks the model input {exc}") from exc
        if ref.shape != cand.shape:
            raise ModelError(
                f"embedding_cosine: {reference_model} gives {ref.shape} but {candidate_model} "
                f"gives {cand.shape}"
            )
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        cosines.append(np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30))
    if not cosines:
        raise DataError("embedding_cosine: no batches given")
    values = np.concatenate(cosines)
    return {"mean": float(values.mean()), "min": float(values.min()), "count": int(values.size)}
