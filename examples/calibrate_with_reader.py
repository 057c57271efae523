"""Calibrate the demo model from a script, with an ONNX Runtime CalibrationDataReader.

Run: python examples/calibrate_with_reader.py OUT_DIR
Shows the Python API: a reader with rewind() (mse takes two passes), a recipe that keeps the
attention's activation x activation MatMuls in fp8 while the rest is int8, and the result object.
"""

from __future__ import annotations

import sys
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader

import qcal_export as qe
from qcal_export.demo import demo_batches, demo_model_path, demo_texts, embedding_cosine


class TextReader(CalibrationDataReader):
    """Yields tokenized batches; rewind() starts again (needed for two-pass methods)."""

    def __init__(self, batches):
        self.batches = batches
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.batches)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = demo_model_path()
    calib, heldout = demo_texts(128, 64)
    recipe = qe.Recipe(
        activation=qe.TensorSpec(format="int8", method="mse"),
        weight=qe.TensorSpec(format="int8", per_channel=True),
        overrides=(
            # MatMuls whose both inputs are activations (QK^T and attention x V) in fp8
            qe.Override(nodes="*/attention/self/MatMul*", activation=qe.TensorSpec(format="fp8")),
        ),
    )
    result = qe.calibrate_onnx(
        model,
        TextReader(demo_batches(calib)),
        recipe=recipe,
        output=out_dir / "minilm_mixed.onnx",
        scales=out_dir / "minilm_mixed.safetensors",
    )
    score = embedding_cosine(model, result.model_path, demo_batches(heldout))
    print(f"wrote {result.model_path}; held-out embedding cosine mean {score['mean']:.4f}")
    print(f"output error on calibration batches: {result.report['output_error']}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "qcal-example"))
