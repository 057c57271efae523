"""The peers of ``bench_cpu_peers.py`` (optional): their options, their imports and one call each.

ModelOpt's ``MseCalibrator`` with its own fake quantization and llmcompressor's
``MovingAverageMSEObserver``; each call returns the amax (or min and max) in our layout.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qcal_export.spec.formats import FP8_E4M3, INT8, Format, IntFormat

MODELOPT_GRID = {"start_multiplier": 0.25, "stop_multiplier": 4.0, "step_size": 0.1}
SHRINK_OPTIONS = {"maxshrink": 0.2, "grid": 100.0, "norm": 2.4, "patience": 5}
INT8_ASYM = IntFormat(bits=8, signed=True, symmetric=False)
FORMATS: dict[str, Format] = {"int8": INT8, "int8-asym": INT8_ASYM, "fp8": FP8_E4M3}


@dataclass(frozen=True)
class Case:
    """One row: a tensor, a format name of ``FORMATS`` and per tensor or per channel (axis 0)."""

    tensor: str
    fmt: str
    per_channel: bool

    @property
    def granularity(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"


def modelopt_mse(x: torch.Tensor, case: Case, amax0: torch.Tensor) -> torch.Tensor:
    """ModelOpt's MseCalibrator with its own fake quantization; amax ``[G]``."""
    from modelopt.torch.quantization.calib import MseCalibrator as ModeloptMse
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant, scaled_e4m3

    def quant_int8(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        # num_bits 8, signed, narrow_range False: TensorQuantizer's defaults, range [-128, 127].
        return fake_tensor_quant(t, amax, None, 8, False, False)

    def quant_fp8(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return scaled_e4m3(t, amax, None, 4, 3)

    cal = ModeloptMse(
        amax=amax0[:, None] if case.per_channel else amax0,
        axis=0 if case.per_channel else None,
        quant_func=quant_fp8 if case.fmt == "fp8" else quant_int8,
        **MODELOPT_GRID,
    )
    cal.collect(x)
    return cal.compute_amax().reshape(-1)


def llmc_shrink(x: torch.Tensor, case: Case, observer: type) -> torch.Tensor:
    """llmcompressor's MSE observer on one batch; the same layout as ``ours_shrink``."""
    from compressed_tensors.quantization import QuantizationArgs

    fmt = FORMATS[case.fmt]
    args = QuantizationArgs(
        num_bits=8,
        type="float" if case.fmt == "fp8" else "int",
        symmetric=fmt.symmetric,
        strategy="channel" if case.per_channel else "tensor",
        observer="mse",
        observer_kwargs=dict(SHRINK_OPTIONS),
    )
    obs = observer(base_name="weight" if case.per_channel else "input", args=args)
    obs(x)
    amin, amax = obs.min_vals.reshape(-1), obs.max_vals.reshape(-1)
    if fmt.symmetric:
        return torch.maximum(amin.abs(), amax.abs())
    return torch.stack([amin.clamp(max=0), amax.clamp(min=0)])


def load_modelopt() -> tuple[bool, str]:
    """Whether ModelOpt's MseCalibrator imports, and what to print about it."""
    if importlib.util.find_spec("modelopt") is None:
        return False, "nvidia-modelopt is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about untested transformers versions
        try:
            import modelopt.torch.quantization.calib  # noqa: F401
        except Exception as error:
            return False, f"nvidia-modelopt does not import: {error!r}"
    return True, "modelopt.torch.quantization.calib.MseCalibrator"


def load_llmc_observer() -> tuple[type | None, str]:
    """llmcompressor's ``MovingAverageMSEObserver`` and how it was imported.

    The package's ``__init__`` imports its whole pipeline (datasets, transformers, auto-round,
    ...); where those are absent, the observer modules are imported on their own, under
    placeholder parent packages that skip the ``__init__`` files.
    """
    spec = importlib.util.find_spec("llmcompressor")
    if spec is None:
        return None, "llmcompressor is not installed"
    try:
        from llmcompressor.observers.mse import MovingAverageMSEObserver

        return MovingAverageMSEObserver, "llmcompressor.observers.mse"
    except ImportError as error:
        reason = f"{error}"
    for name in [m for m in sys.modules if m == "llmcompressor" or m.startswith("llmcompressor.")]:
        del sys.modules[name]
    root = Path(spec.submodule_search_locations[0])
    for name in ("llmcompressor", "llmcompressor.utils", "llmcompressor.observers"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = package
    try:
        from llmcompressor.observers.mse import MovingAverageMSEObserver
    except Exception as error:
        return None, f"llmcompressor's observer does not import: {error!r}"
    how = f"llmcompressor.observers.mse, without the package __init__ ({reason})"
    return MovingAverageMSEObserver, how
