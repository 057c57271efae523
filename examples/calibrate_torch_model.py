"""Calibrate a torch model with forward hooks, then export its QDQ ONNX form.

Run: python examples/calibrate_torch_model.py OUT_DIR [--method max|mse|percentile|...]
The demo's all-MiniLM-L6-v2 (a transformers BertModel with mean pooling) is calibrated in
torch on 256 texts, exported with torch.onnx.export, and the scales are mapped from module
names onto the exported graph; the QDQ model is scored on 128 held-out texts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import qcal_export as qe
from qcal_export.demo import demo_batches, demo_texts, embedding_cosine, sentence_encoder

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--method", default="max", choices=qe.recipe.METHODS)
    parser.add_argument("--format", default="int8")
    parser.add_argument("--dynamo", action="store_true", help="torch.export-based exporter")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    model = sentence_encoder()
    calib_texts, heldout_texts = demo_texts(256, 128)
    calib = [{k: torch.from_numpy(v) for k, v in b.items()} for b in demo_batches(calib_texts)]
    calibration = qe.calibrate_torch(model, calib, format=args.format, method=args.method)
    print(
        f"calibrated {len(calibration.modules)} modules in {calibration.batches_per_pass} batches"
    )

    sample = tuple(calib[0][name] for name in INPUTS)
    axes = {name: {0: "batch", 1: "seq"} for name in INPUTS}
    path = args.out_dir / f"minilm_torch_{args.format}_{args.method}.onnx"
    float_path = args.out_dir / "minilm_torch_float.onnx"
    export = dict(
        input_names=list(INPUTS),
        output_names=["sentence_embedding"],
        dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
        opset_version=17,
    )
    if args.dynamo:
        export = {"input_names": list(INPUTS), "output_names": ["sentence_embedding"]}
        export["dynamic_shapes"] = {
            name: {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for name in INPUTS
        }
    result = calibration.export_onnx(sample, path, dynamo=args.dynamo, **export)
    print(f"mapped {len(result.mapped)} modules; unmapped: {result.unmapped or 'none'}")
    torch.onnx.export(model, sample, float_path, dynamo=args.dynamo, **export)
    heldout = demo_batches(heldout_texts)
    score = embedding_cosine(float_path, path, heldout)
    print(f"held-out cosine vs float: mean {score['mean']:.4f}, min {score['min']:.4f} ({path})")
    with torch.no_grad(), calibration.fake_quantize() as fake:
        batch = {k: torch.from_numpy(v) for k, v in heldout[0].items()}
        torch_side = fake(**batch).numpy()
    print(
        f"torch fake-quant vs float, first held-out batch: mean cosine "
        f"{float(np.mean(np.sum(torch_side * model(**batch).detach().numpy(), axis=1))):.4f}"
    )


if __name__ == "__main__":
    main()
