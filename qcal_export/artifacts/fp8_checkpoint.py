"""Serving checkpoints of FP8 E4M3 (W8A8 or weight-only) linear layers: the ModelOpt and
compressed-tensors (``float-quantized``) layouts.

Both store the weight's FP8 codes (``weight`` float8_e4m3fn [out, in]), a float32
``weight_scale`` and, for static activations, a float32 per-tensor ``input_scale``; both
dequantize ``fl(fp8 * weight_scale)``, the ONNX DequantizeLinear's float32 arithmetic, so the
checkpoint's weight equals the QDQ graph's bit for bit (fp16/bf16 models: before the graph's
final rounding to its own type, as the product of an FP8 value and a scale of that type is exact
in float32). compressed-tensors takes per-channel (``[out, 1]``) or per-tensor (``[1]``) weight
scales, with or without an input scale. ModelOpt's ``FP8`` (what vLLM and TensorRT-LLM load)
takes one weight scale per tensor (``[]``) and a static input scale: a per-channel calibration
whose channels share one scale is written as that scale (exact); any other is refused, as is a
weight-only one (OutputError naming the layer and what to calibrate or write instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcal_export.artifacts.checkpoint import (
    CONFIG_FILE,
    CT_VERSION,
    LAYOUTS,
    WEIGHTS_FILE,
    modelopt_configs,
    read_checkpoint,
    write_layers,
)
from qcal_export.errors import OutputError, ScalesError
from qcal_export.spec.choices import CheckpointLayout

CT_FP8_FORMAT = "float-quantized"
MODELOPT_ALGO = "FP8"
_NORMAL_MIN, _INF = 2.0**-126, float("inf")


@dataclass
class FP8Linear:
    """One FP8 linear layer in serving orientation (torch ``Linear``: ``[out, in]``).

    ``weight`` float8_e4m3fn [out, in], the codes the ONNX graph stores; ``weight_scale`` float32
    [out] (per output channel) or [] (per tensor); ``input_scale`` float32 [] (static, per
    tensor) or None for weight-only; ``bias`` [out] or None.
    """

    name: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.ndim == 1

    def dequantized(self) -> torch.Tensor:
        """float32 [out, in]: ``fp8 * scale``, one float32 rounding per element."""
        scale = self.weight_scale.reshape(-1, 1) if self.per_channel else self.weight_scale
        return self.weight.float() * scale.float()


def write_fp8_checkpoint(
    directory: str | Path,
    layers: Sequence[FP8Linear],
    layout: str,
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    ignore: Sequence[str] = (),
    base_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``layers`` (and ``extra_tensors`` as they are) as an FP8 serving checkpoint.

    Files, each written atomically into ``directory``: model.safetensors, config.json
    (``base_config`` plus its ``quantization_config``) and, for ModelOpt, hf_quant_config.json.
    ``ignore``: the Linear modules left in float. Returns the directory.
    """
    if layout not in LAYOUTS:
        raise OutputError(f"unknown checkpoint layout {layout!r}: choose one of {list(LAYOUTS)}")
    static = check_fp8_layers(layers, layout)
    modelopt = layout == CheckpointLayout.MODELOPT.value
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        own = {"weight": layer.weight, "weight_scale": _stored_scale(layer, modelopt)}
        if layer.input_scale is not None:
            own["input_scale"] = layer.input_scale.float().reshape(() if modelopt else (1,))
        if layer.bias is not None:
            own["bias"] = layer.bias
        tensors |= {f"{layer.name}.{key}": value for key, value in own.items()}
    return write_layers(
        directory,
        tensors,
        [layer.name for layer in layers],
        lambda: (
            _modelopt_configs(list(ignore))
            if modelopt
            else _ct_configs(layers, static, list(ignore))
        ),
        extra_tensors=extra_tensors,
        ignore=ignore,
        base_config=base_config,
    )


def load_fp8_checkpoint(
    directory: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """Read an FP8 checkpoint written here: ({layer: float32 [out, in] ``fp8 * weight_scale``},
    {layer: input scale}, config.json). The layers are the float8_e4m3fn ``<layer>.weight``."""
    folder = Path(directory)
    tensors, config = read_checkpoint(folder)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in LAYOUTS:
        raise ScalesError(
            f"{folder / CONFIG_FILE}: quant_method {method!r} is not an FP8 checkpoint layout; "
            f"expected one of {list(LAYOUTS)}"
        )
    names = [
        key.removesuffix(".weight")
        for key, value in tensors.items()
        if key.endswith(".weight") and value.dtype == torch.float8_e4m3fn
    ]
    weights, input_scales = {}, {}
    for name in sorted(names):
        scale = tensors.get(f"{name}.weight_scale")
        if scale is None or scale.dtype != torch.float32:
            raise ScalesError(
                f"{folder / WEIGHTS_FILE}: layer {name!r} has no float32 weight_scale"
            )
        per_channel = scale.ndim == 2  # compressed-tensors' [out, 1]
        scale = scale.reshape(-1, 1) if per_channel else scale.reshape(())
        weights[name] = tensors[f"{name}.weight"].float() * scale
        if f"{name}.input_scale" in tensors:
            input_scales[name] = tensors[f"{name}.input_scale"].item()
    return weights, input_scales, config


def _stored_scale(layer: FP8Linear, modelopt: bool) -> torch.Tensor:
    """ModelOpt: [] (per-channel scales that are all equal become that one, exactly);
    compressed-tensors: [out, 1] per channel, [1] per tensor."""
    scale = layer.weight_scale.float()
    if modelopt:
        return scale.reshape(-1)[0].clone() if layer.per_channel else scale.reshape(())
    return scale.reshape(-1, 1) if layer.per_channel else scale.reshape(1)


def check_fp8_layers(layers: Sequence[FP8Linear], layout: str) -> bool:
    """Check every layer for ``layout`` (OutputError naming it); True when all have a static
    input scale."""
    if not layers:
        raise OutputError("no layers to write: give at least one FP8Linear")
    names = [layer.name for layer in layers]
    if doubled := sorted({name for name in names if names.count(name) > 1}):
        raise OutputError(f"layer names {doubled} appear more than once")
    for layer in layers:
        _check_layer(layer, layout)
    static = [layer.name for layer in layers if layer.input_scale is not None]
    if 0 < len(static) < len(layers):
        weight_only = [name for name in names if name not in static]
        raise OutputError(
            f"layers mix W8A8 ({static[:3]} have an input scale) and weight-only "
            f"({weight_only[:3]} have none): a checkpoint holds one scheme"
        )
    return bool(static)


def _check_layer(layer: FP8Linear, layout: str) -> None:
    weight, where = layer.weight, f"layer {layer.name!r}"
    if weight.ndim != 2 or weight.dtype != torch.float8_e4m3fn:
        raise OutputError(
            f"{where}: weight must be float8_e4m3fn [out, in], got {weight.dtype} "
            f"{list(weight.shape)}"
        )
    out = weight.shape[0]
    scale = layer.weight_scale
    if list(scale.shape) not in ([out], []):
        raise OutputError(
            f"{where}: weight_scale must be [{out}] (per channel) or [] (per tensor), got "
            f"{list(scale.shape)}"
        )
    for what, value in (("weight_scale", scale), ("input_scale", layer.input_scale)):
        if value is not None and not ((value >= _NORMAL_MIN) & (value < _INF)).all():
            raise OutputError(f"{where}: {what} must hold positive normal float32 values")
    if layer.bias is not None and list(layer.bias.shape) != [out]:
        raise OutputError(f"{where}: bias must be [{out}], got {list(layer.bias.shape)}")
    if layout != CheckpointLayout.MODELOPT.value:
        return
    if layer.per_channel and not (scale == scale.reshape(-1)[0]).all():
        raise OutputError(
            f"{where}: ModelOpt FP8 holds one weight scale per tensor, this one was calibrated "
            "per output channel: calibrate with --no-per-channel-weights, or write "
            "--checkpoint-layout compressed-tensors"
        )
    if layer.input_scale is None:
        raise OutputError(
            f"{where}: ModelOpt FP8 quantizes activations with a static input scale and this "
            "layer has none: calibrate activations as fp8 (--activation-format fp8), or write "
            "--checkpoint-layout compressed-tensors (FP8 weight-only)"
        )


def _modelopt_configs(ignore: list[str]) -> dict[str, dict]:
    """hf_quant_config.json and ``quantization_config`` of ModelOpt's FP8 (per-tensor weights,
    static per-tensor activations)."""
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    group = {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}
    return modelopt_configs(MODELOPT_ALGO, group, ignore)


def _ct_configs(layers: Sequence[FP8Linear], static: bool, ignore: list[str]) -> dict[str, dict]:
    """``quantization_config`` as compressed-tensors writes its FP8 schemes: one group per weight
    strategy (``channel``, ``tensor``), the targets being the layer names."""
    strategies: dict[str, list[str]] = {}
    for layer in layers:
        strategies.setdefault("channel" if layer.per_channel else "tensor", []).append(layer.name)
    groups = {}
    for i, (strategy, names) in enumerate(sorted(strategies.items())):
        groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": _ct_args(strategy, observer="minmax"),
            "input_activations": _ct_args("tensor", observer="static_minmax") if static else None,
            "output_activations": None,
            "format": CT_FP8_FORMAT,
        }
    config = {
        "config_groups": groups,
        "quant_method": CheckpointLayout.COMPRESSED_TENSORS.value,
        "kv_cache_scheme": None,
        "format": CT_FP8_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
    return {CONFIG_FILE: config}


def _ct_args(strategy: str, observer: str) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of static, symmetric FP8 E4M3."""
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}
    args |= {"strategy": strategy, "block_structure": None, "dynamic": False, "actorder": None}
    return args | {"observer": observer, "observer_kwargs": {}}
