"""Serving checkpoints of MX linear layers where a public layout defines them.

compressed-tensors defines both formats (its ``MXFP8``/``MXFP8A16`` and ``MXFP4``/``MXFP4A16``
presets: group strategy, 32 inputs per group, ``scale_dtype`` uint8, activations dynamic):
``mxfp8-quantized`` stores ``weight`` float8_e4m3fn [out, in] and ``mxfp4-pack-quantized``
``weight_packed`` uint8 [out, in/2] (element 2i in the low nibble), each with ``weight_scale``
uint8 [out, in/32], the E8M0 code ``e + 127`` of the block's scale ``2^e``. ModelOpt's HF export
defines ``MXFP8`` (``quant_algo`` "MXFP8", ``group_size`` 32, the same two tensors; its config
lists the activations, which it quantizes dynamically per block, so it holds no weight-only
form); it has no MXFP4 checkpoint layout (its ``mxfp4`` layers fall through its config writer as
an unsupported algorithm), so ModelOpt MXFP4 is refused here. No layout holds an input tensor
for MX activations: their scales are computed at run time. Every layout dequantizes
``element * 2^(code - 127)``, exact in float32: the ONNX DequantizeLinear's values bit for bit.
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
from qcal_export.spec.formats import pack_nibbles, unpack_nibbles
from qcal_export.spec.mx_formats import MXFP4, MXFP8, MXFormat, e8m0_values

MX_FORMATS: dict[str, MXFormat] = {MXFP8.name: MXFP8, MXFP4.name: MXFP4}
CT_MX_FORMATS = {MXFP8.name: "mxfp8-quantized", MXFP4.name: "mxfp4-pack-quantized"}
MODELOPT_MX_ALGO = "MXFP8"
BLOCK = 32


@dataclass
class MXLinear:
    """One MX linear layer in serving orientation (torch ``Linear``: ``[out, in]``).

    ``codes``: the elements the ONNX graph stores, float8_e4m3fn [out, in] (mxfp8) or E2M1 codes
    uint8 0..15 [out, in] (mxfp4); ``exponents`` uint8 [out, in/32], E8M0 codes (``e + 127``);
    ``dynamic_activations``: the inputs are MX too (W8A8 / W4A4), else weight-only.
    """

    name: str
    format: str
    codes: torch.Tensor
    exponents: torch.Tensor
    dynamic_activations: bool
    bias: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """Float32 [out, in]: each element times ``2^(code - 127)`` (exact)."""
        codes = self.codes
        values = MX_FORMATS[self.format].decode(
            codes.view(torch.uint8) if codes.is_floating_point() else codes
        )
        scale = e8m0_values(self.exponents)
        return values * scale.repeat_interleave(BLOCK, dim=1)


def write_mx_checkpoint(
    directory: str | Path,
    layers: Sequence[MXLinear],
    layout: str,
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    ignore: Sequence[str] = (),
    base_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``layers`` (and ``extra_tensors`` as they are) as an MX serving checkpoint.

    Files, each written atomically into ``directory``: model.safetensors, config.json
    (``base_config`` plus its ``quantization_config``) and, for ModelOpt, hf_quant_config.json.
    ``ignore``: the Linear modules left in float. Returns the directory.
    """
    fmt, dynamic = check_mx_layers(layers, layout)
    packed = fmt == MXFP4.name
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        out = layer.codes.shape[0]
        weight = pack_nibbles(layer.codes).reshape(out, -1) if packed else layer.codes
        own = {"weight_packed" if packed else "weight": weight, "weight_scale": layer.exponents}
        if layer.bias is not None:
            own["bias"] = layer.bias
        tensors |= {f"{layer.name}.{key}": value for key, value in own.items()}
    names = [layer.name for layer in layers]
    modelopt = layout == CheckpointLayout.MODELOPT.value
    return write_layers(
        directory,
        tensors,
        names,
        lambda: (
            _modelopt_configs(list(ignore))
            if modelopt
            else _ct_configs(fmt, names, dynamic, list(ignore))
        ),
        extra_tensors=extra_tensors,
        ignore=ignore,
        base_config=base_config,
    )


def load_mx_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an MX checkpoint written here: ({layer: float32 [out, in]}, config.json); the
    layers are those with a uint8 ``weight_scale``, their format the config's."""
    folder = Path(directory)
    tensors, config = read_checkpoint(folder)
    quantization = config.get("quantization_config") or {}
    fmt = _format_of(quantization)
    if fmt is None:
        raise ScalesError(f"{folder / CONFIG_FILE}: quantization_config is not an MX layout")
    element = "weight_packed" if fmt == MXFP4.name else "weight"
    weights = {}
    for key, scale in tensors.items():
        if not key.endswith(".weight_scale") or scale.dtype != torch.uint8:
            continue
        name = key.removesuffix(".weight_scale")
        stored = tensors.get(f"{name}.{element}")
        if stored is None or stored.shape[0] != scale.shape[0]:
            raise ScalesError(f"{folder / WEIGHTS_FILE}: layer {name!r} has no {element}")
        codes = stored
        if fmt == MXFP4.name:
            codes = unpack_nibbles(stored, stored.numel() * 2).reshape(stored.shape[0], -1)
        weights[name] = MXLinear(name, fmt, codes, scale, False).dequantized()
    return weights, config


def _format_of(quantization: Mapping[str, Any]) -> str | None:
    if quantization.get("quant_algo") == MODELOPT_MX_ALGO:
        return MXFP8.name
    by_ct = {value: key for key, value in CT_MX_FORMATS.items()}
    return by_ct.get(quantization.get("format"))


def check_mx_layers(layers: Sequence[MXLinear], layout: str) -> tuple[str, bool]:
    """(format, dynamic activations) of ``layers`` for ``layout``; OutputError naming the layer
    or the layout's limit otherwise."""
    if layout not in LAYOUTS:
        raise OutputError(f"unknown checkpoint layout {layout!r}: choose one of {list(LAYOUTS)}")
    if not layers:
        raise OutputError("no layers to write: give at least one MXLinear")
    names = [layer.name for layer in layers]
    if doubled := sorted({name for name in names if names.count(name) > 1}):
        raise OutputError(f"layer names {doubled} appear more than once")
    schemes = {(layer.format, layer.dynamic_activations) for layer in layers}
    if len(schemes) > 1:
        raise OutputError(
            f"layers mix MX schemes {sorted(schemes)} (format, MX activations): a checkpoint "
            "holds one"
        )
    for layer in layers:
        _check_layer(layer)
    ((fmt, dynamic),) = schemes
    if layout == CheckpointLayout.MODELOPT.value:
        _check_modelopt(fmt, dynamic)
    return fmt, dynamic


def _check_modelopt(fmt: str, dynamic: bool) -> None:
    """ModelOpt's HF checkpoint holds MXFP8 with MX activations only."""
    if fmt != MXFP8.name:
        raise OutputError(
            f"ModelOpt's HF checkpoint defines no {fmt} layout (only MXFP8): write "
            "--checkpoint-layout compressed-tensors"
        )
    if not dynamic:
        raise OutputError(
            "ModelOpt MXFP8 quantizes activations as MXFP8 too and these layers are "
            "weight-only: calibrate with --activation-format mxfp8, or write "
            "--checkpoint-layout compressed-tensors (MXFP8A16)"
        )


def _check_layer(layer: MXLinear) -> None:
    where = f"layer {layer.name!r}"
    if layer.format not in MX_FORMATS:
        raise OutputError(f"{where}: format {layer.format!r} is not one of {list(MX_FORMATS)}")
    dtype = MX_FORMATS[layer.format].storage_dtype
    codes, exponents = layer.codes, layer.exponents
    if codes.ndim != 2 or codes.dtype != dtype:
        raise OutputError(
            f"{where}: codes must be {dtype} [out, in], got {codes.dtype} {list(codes.shape)}"
        )
    out, inputs = codes.shape
    if inputs % BLOCK:
        raise OutputError(
            f"{where}: in_features {inputs} is not a multiple of 32, as the MX layouts require; "
            "keep the layer in float (qcal calibrate --exclude)"
        )
    expected = [out, inputs // BLOCK]
    if exponents.dtype != torch.uint8 or list(exponents.shape) != expected:
        raise OutputError(
            f"{where}: exponents must be uint8 {expected}, got {exponents.dtype} "
            f"{list(exponents.shape)}"
        )
    if bool((exponents == 255).any()):
        raise OutputError(f"{where}: exponents hold the E8M0 NaN code 255")
    if layer.bias is not None and list(layer.bias.shape) != [out]:
        raise OutputError(f"{where}: bias must be [{out}], got {list(layer.bias.shape)}")


def _modelopt_configs(ignore: list[str]) -> dict[str, dict]:
    """hf_quant_config.json and ``quantization_config`` of ModelOpt's MXFP8
    (``process_layer_quant_config``, ``convert_hf_quant_config_format``)."""
    mx = {"dynamic": False, "num_bits": 8, "type": "float", "group_size": BLOCK}
    group = {"input_activations": mx, "weights": mx, "targets": ["Linear"]}
    return modelopt_configs(MODELOPT_MX_ALGO, group, ignore, group_size=BLOCK)


def _ct_configs(fmt: str, names: list[str], dynamic: bool, ignore: list[str]) -> dict[str, dict]:
    """``quantization_config`` as compressed-tensors writes its MX presets (MXFP8, MXFP4 and
    their A16 forms); the targets are the layer names."""
    bits = 8 if fmt == MXFP8.name else 4
    group = {
        "targets": sorted(names),
        "weights": _ct_args(bits, dynamic=False, observer="minmax"),
        "input_activations": _ct_args(bits, dynamic=True, observer=None) if dynamic else None,
        "output_activations": None,
        "format": CT_MX_FORMATS[fmt],
    }
    config = {
        "config_groups": {"group_0": group},
        "quant_method": CheckpointLayout.COMPRESSED_TENSORS.value,
        "kv_cache_scheme": None,
        "format": CT_MX_FORMATS[fmt],
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
    return {CONFIG_FILE: config}


def _ct_args(bits: int, dynamic: bool, observer: str | None) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of an MX format: float elements, groups of 32 inputs,
    uint8 (E8M0) scales."""
    args = {"num_bits": bits, "type": "float", "symmetric": True, "group_size": BLOCK}
    args |= {"strategy": "group", "block_structure": None, "dynamic": dynamic, "actorder": None}
    args |= {"scale_dtype": "torch.uint8", "zp_dtype": None}
    return args | {"observer": observer, "observer_kwargs": {}}
