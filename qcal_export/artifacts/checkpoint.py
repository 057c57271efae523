"""Serving checkpoints of NVFP4 linear layers: the ModelOpt and compressed-tensors layouts.

Both store the weight's E2M1 codes packed two per byte along ``in`` (element ``2i`` in the low
nibble), an FP8 E4M3 scale per 16 inputs and a float32 global scale per tensor; the codes are the
ones the ONNX DequantizeLinear chain decodes. ModelOpt stores the global scale ``s = amax / 2688``
and dequantizes ``e2m1 * fl(fp8 * s)``: our ONNX arithmetic, bit for bit. compressed-tensors
stores ``g = fl(1 / s)`` (what its own ModelOpt converter computes) and dequantizes
``e2m1 * fl(fp8 / g)``. A quotient cannot reproduce every product: the effective scales agree for
about three block scales in four and are otherwise one ulp apart (the best nearby float32 ``g``
agrees on 1% more), so a weight differs from ours by at most ``(1+u)^2 / (1-u)^3 - 1 ~ 5u``
relative, u = 2^-24 (3u observed), wherever the results are normal float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qcal_export.errors import OutputError, ScalesError
from qcal_export.files.atomic import atomic_path, write_file
from qcal_export.spec.choices import CheckpointLayout
from qcal_export.spec.e2m1 import E2M1_VALUES
from qcal_export.spec.formats import NVFP4, pack_nibbles, unpack_nibbles

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
CT_FORMAT = "nvfp4-pack-quantized"
CT_VERSION = "0.20.0"
"""The compressed-tensors release whose config layout we write and load-test against."""

_E2M1_SIGNED = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
_NORMAL_MIN, _INF = 2.0**-126, float("inf")


@dataclass
class NVFP4Linear:
    """One NVFP4 linear layer in serving orientation (torch ``Linear``: ``[out, in]``).

    ``weight`` float32 [out, in]; ``block_scales`` float8_e4m3fn [out, in // 16] (chosen by a
    calibrator); ``global_scale`` float32 [] = weight amax / (6 * 448); ``input_global_scale``
    float32 [] = activation amax / (6 * 448), None for weight-only; ``bias`` [out] or None.
    """

    name: str
    weight: torch.Tensor
    block_scales: torch.Tensor
    global_scale: torch.Tensor
    input_global_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None


QuantConfigs = Callable[[list[str], bool, list[str]], dict[str, dict]]


@dataclass(frozen=True)
class LayoutSpec:
    """Tensor names of one serving layout, per layer ``<name>.<tensor>``, and its scale direction.

    ``packed``: uint8 [out, in/2] codes; ``weight_scale``: float8_e4m3fn [out, in/16];
    ``global_name`` / ``input_name`` (W4A4 only): float32 of ``scalar_shape``, the weight's /
    activations' global scale, or its reciprocal where ``reciprocal``. ``quant_configs(names,
    w4a4, ignore)`` gives {file name: JSON}; config.json's entry is its ``quantization_config``.
    """

    name: CheckpointLayout
    packed: str
    global_name: str
    input_name: str
    scalar_shape: tuple[int, ...]
    reciprocal: bool
    quant_configs: QuantConfigs

    def stored_scale(self, global_scale: torch.Tensor) -> torch.Tensor:
        scale = global_scale.float().reshape(self.scalar_shape)
        return 1.0 / scale if self.reciprocal else scale

    def effective_scales(self, block_scales: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Float32 [out, in/16] as the layout's own library computes them."""
        if self.reciprocal:
            return block_scales.float() / stored
        return NVFP4.effective_scales(block_scales, stored)


def _modelopt_configs(names: list[str], w4a4: bool, ignore: list[str]) -> dict[str, dict]:
    """hf_quant_config.json and ``quantization_config`` as ModelOpt writes them for NVFP4
    (``process_layer_quant_config``, ``convert_hf_quant_config_format``)."""
    algo = "NVFP4" if w4a4 else "W4A16_NVFP4"
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group = ({"input_activations": fp4} if w4a4 else {}) | {"weights": fp4, "targets": ["Linear"]}
    return modelopt_configs(algo, group, ignore, group_size=16)


def modelopt_configs(
    algo: str, group: dict[str, Any], ignore: list[str], **quantization: Any
) -> dict[str, dict]:
    """ModelOpt's two config files for one ``quant_algo`` and its config group: hf_quant_config
    .json's ``quantization`` (with ``quantization`` entries beside the algorithm) and
    config.json's ``quantization_config``; ``ignore`` the layers left in float."""
    from qcal_export.version import __version__

    producer = {"name": "qcal_export", "version": __version__}
    entries = {"quant_algo": algo, "kv_cache_quant_algo": None, **quantization}
    return {
        HF_QUANT_CONFIG_FILE: {
            "producer": producer,
            "quantization": entries | {"exclude_modules": ignore},
        },
        CONFIG_FILE: {
            "config_groups": {"group_0": group},
            "ignore": ignore,
            "quant_algo": algo,
            "producer": producer,
            "quant_method": CheckpointLayout.MODELOPT.value,
        },
    }


def _ct_configs(names: list[str], w4a4: bool, ignore: list[str]) -> dict[str, dict]:
    """``quantization_config`` as compressed-tensors' ModelCompressor writes it for its NVFP4
    (W4A4) and NVFP4A16 (weight-only) presets; the targets are the layer names."""
    group = {
        "targets": sorted(names),
        "weights": _ct_args(dynamic=False, observer="minmax"),
        "input_activations": _ct_args(dynamic="local", observer="static_minmax") if w4a4 else None,
        "output_activations": None,
        "format": CT_FORMAT,
    }
    config = {
        "config_groups": {"group_0": group},
        "quant_method": CheckpointLayout.COMPRESSED_TENSORS.value,
        "kv_cache_scheme": None,
        "format": CT_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
    return {CONFIG_FILE: config}


def _ct_args(dynamic: bool | str, observer: str) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of NVFP4: E2M1 values, FP8 scales over 16 inputs."""
    fp4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16}
    fp4 |= {"strategy": "tensor_group", "block_structure": None, "dynamic": dynamic}
    fp4 |= {"actorder": None, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None}
    return fp4 | {"observer": observer, "observer_kwargs": {}}


MODELOPT = LayoutSpec(
    name=CheckpointLayout.MODELOPT,
    packed="weight",
    global_name="weight_scale_2",
    input_name="input_scale",
    scalar_shape=(),
    reciprocal=False,
    quant_configs=_modelopt_configs,
)
COMPRESSED_TENSORS = LayoutSpec(
    name=CheckpointLayout.COMPRESSED_TENSORS,
    packed="weight_packed",
    global_name="weight_global_scale",
    input_name="input_global_scale",
    scalar_shape=(1,),
    reciprocal=True,
    quant_configs=_ct_configs,
)
LAYOUT_BY_NAME = {layout.name: layout for layout in (MODELOPT, COMPRESSED_TENSORS)}
"""Each layout's tensor names and configs (a test holds it equal to ``CheckpointLayout``)."""
LAYOUTS = tuple(CheckpointLayout.values())


def write_nvfp4_checkpoint(
    directory: str | Path,
    layers: Sequence[NVFP4Linear],
    layout: str,
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    ignore: Sequence[str] = (),
    base_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``layers`` (and ``extra_tensors`` as they are) as a serving checkpoint.

    Files, each written atomically into ``directory`` (created if missing): model.safetensors,
    config.json (``base_config`` plus its ``quantization_config``) and, for ModelOpt,
    hf_quant_config.json. ``ignore``: the Linear modules left in float. Returns the directory.
    """
    if layout not in LAYOUT_BY_NAME:
        raise OutputError(f"unknown checkpoint layout {layout!r}: choose one of {list(LAYOUTS)}")
    form, w4a4 = LAYOUT_BY_NAME[layout], _check_layers(layers)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        own = {form.packed: _pack(layer), "weight_scale": layer.block_scales}
        own[form.global_name] = form.stored_scale(layer.global_scale)
        if layer.input_global_scale is not None:
            own[form.input_name] = form.stored_scale(layer.input_global_scale)
        if layer.bias is not None:
            own["bias"] = layer.bias
        tensors |= {f"{layer.name}.{key}": value for key, value in own.items()}
    names = [layer.name for layer in layers]
    return write_layers(
        directory,
        tensors,
        names,
        lambda: form.quant_configs(names, w4a4, list(ignore)),
        extra_tensors=extra_tensors,
        ignore=ignore,
        base_config=base_config,
    )


def write_layers(
    directory: str | Path,
    tensors: dict[str, torch.Tensor],
    names: Sequence[str],
    configs: Callable[[], dict[str, dict]],
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None,
    ignore: Sequence[str],
    base_config: Mapping[str, Any] | None,
) -> Path:
    """What every layout's writer does once its layers' ``tensors`` are built: refuse a layer
    both written and in ``ignore`` and extra tensors that collide with the layers', then write
    the tensors and ``configs()`` (config.json's ``quantization_config`` merged into
    ``base_config``)."""
    if quantized_and_ignored := sorted(set(ignore) & set(names)):
        raise OutputError(f"layers {quantized_and_ignored} are both written and in ignore")
    extra = dict(extra_tensors or {})
    if clash := sorted(set(tensors) & set(extra)):
        raise OutputError(f"extra_tensors {clash} collide with the quantized layers' tensors")
    files = configs()
    files[CONFIG_FILE] = {**(base_config or {}), "quantization_config": files[CONFIG_FILE]}
    return write_checkpoint_files(directory, tensors | extra, files)


def write_checkpoint_files(
    directory: str | Path, tensors: Mapping[str, torch.Tensor], files: Mapping[str, dict]
) -> Path:
    """model.safetensors and the JSON ``files`` {name: content}, each written atomically into
    ``directory`` (created if missing); a stale hf_quant_config.json is removed. Returns it."""
    folder = make_directory(directory)
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights, "checkpoint weights", failures=(OSError, SafetensorError)) as tmp:
        save_file(storable(tensors), str(tmp), metadata={"format": "pt"})
    for file_name, content in files.items():
        write_file(folder / file_name, json.dumps(content, indent=2) + "\n", "checkpoint config")
    if HF_QUANT_CONFIG_FILE not in files:
        (folder / HF_QUANT_CONFIG_FILE).unlink(missing_ok=True)  # a stale ModelOpt marker
    return folder


def load_nvfp4_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written here: ({layer name: float32 [out, in]}, config.json).

    The layout comes from ``quantization_config.quant_method``; each weight is dequantized the
    way that layout's own library does it.
    """
    folder = Path(directory)
    tensors, config = read_checkpoint(folder)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in LAYOUT_BY_NAME:
        raise ScalesError(
            f"{folder / CONFIG_FILE}: quant_method {method!r} is not an NVFP4 checkpoint "
            f"layout; expected one of {list(LAYOUTS)}"
        )
    form, suffix = LAYOUT_BY_NAME[method], f".{LAYOUT_BY_NAME[method].packed}"
    names = [
        k[: -len(suffix)]
        for k, v in tensors.items()
        if k.endswith(suffix) and v.dtype == torch.uint8
    ]
    weights = {}
    for name in sorted(names):
        try:
            block, stored = tensors[f"{name}.weight_scale"], tensors[f"{name}.{form.global_name}"]
            weights[name] = _dequantize(
                tensors[name + suffix], form.effective_scales(block, stored)
            )
        except (KeyError, RuntimeError) as e:
            raise ScalesError(
                f"{folder / WEIGHTS_FILE}: layer {name!r} is unreadable: {e}"
            ) from None
    return weights, config


def _check_layers(layers: Sequence[NVFP4Linear]) -> bool:
    """Check every layer (OutputError naming it); True when all are W4A4, False weight-only."""
    if not layers:
        raise OutputError("no layers to write: give at least one NVFP4Linear")
    names = [layer.name for layer in layers]
    if doubled := sorted({name for name in names if names.count(name) > 1}):
        raise OutputError(f"layer names {doubled} appear more than once")
    for layer in layers:
        _check_layer(layer)
    w4a4 = [layer.name for layer in layers if layer.input_global_scale is not None]
    if 0 < len(w4a4) < len(layers):
        weight_only = [name for name in names if name not in w4a4]
        raise OutputError(
            f"layers mix W4A4 ({w4a4[:3]} have input_global_scale) and weight-only "
            f"({weight_only[:3]} have none): a checkpoint holds one scheme"
        )
    return bool(w4a4)


def _check_layer(layer: NVFP4Linear) -> None:
    weight, where = layer.weight, f"layer {layer.name!r}"
    if weight.ndim != 2 or not weight.is_floating_point():
        raise OutputError(
            f"{where}: weight must be float [out, in], got {weight.dtype} {list(weight.shape)}"
        )
    out, inputs = weight.shape
    if inputs % NVFP4.block_size:
        raise OutputError(
            f"{where}: in_features {inputs} is not a multiple of 16, as ModelOpt and "
            "compressed-tensors require; keep the layer in float (qcal calibrate --exclude)"
        )
    scales, expected = layer.block_scales, [out, inputs // NVFP4.block_size]
    if scales.dtype != torch.float8_e4m3fn or list(scales.shape) != expected:
        raise OutputError(
            f"{where}: block_scales must be float8_e4m3fn {expected} for weight [{out}, {inputs}]"
            f", got {scales.dtype} {list(scales.shape)}"
        )
    for what in ("global_scale", "input_global_scale"):
        scale = getattr(layer, what)
        if scale is not None and (scale.numel() != 1 or not _NORMAL_MIN <= float(scale) < _INF):
            raise OutputError(f"{where}: {what} must be one positive normal float32, got {scale}")
    if not (NVFP4.effective_scales(scales, layer.global_scale.float()) > 0).all():
        raise OutputError(f"{where}: block_scales hold zero, negative or NaN codes; floor at 2^-9")
    if not torch.isfinite(weight).all():
        raise OutputError(f"{where}: weight holds NaN or infinite values")
    if layer.bias is not None and list(layer.bias.shape) != [out]:
        raise OutputError(f"{where}: bias must be [{out}], got {list(layer.bias.shape)}")


def _pack(layer: NVFP4Linear) -> torch.Tensor:
    """The weight's E2M1 codes under its effective block scales, packed: uint8 [out, in/2]."""
    out, inputs = layer.weight.shape
    blocks = layer.weight.float().reshape(out, -1, NVFP4.block_size)
    effective = NVFP4.effective_scales(layer.block_scales, layer.global_scale.float().reshape(()))
    codes = NVFP4.quantize(blocks, effective.unsqueeze(-1), torch.zeros(()))
    return pack_nibbles(codes).reshape(out, inputs // 2)


def _dequantize(packed: torch.Tensor, effective: torch.Tensor) -> torch.Tensor:
    """Float32 [out, in] from packed codes uint8 [out, in/2] and effective scales [out, in/16]."""
    out, half = packed.shape
    values = _E2M1_SIGNED[unpack_nibbles(packed, out * half * 2).long()]
    return (values.reshape(out, -1, NVFP4.block_size) * effective.unsqueeze(-1)).reshape(out, -1)


def storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; one sharing storage with another (tied weights) is copied."""
    stored, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        stored[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    return stored


def make_directory(directory: str | Path) -> Path:
    folder = Path(directory)
    if not folder.parent.is_dir():
        raise OutputError(f"checkpoint directory {folder}: {folder.parent} does not exist")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"checkpoint directory {folder} is a file: give a directory")
    folder.mkdir(exist_ok=True)
    return folder


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of model.safetensors and the config.json object; ScalesError names the file."""
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open)
        path = folder / CONFIG_FILE
        config = json.loads(path.read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise ScalesError(f"{path} is not a readable checkpoint file: {e}") from None
    if not isinstance(config, dict):
        raise ScalesError(f"{path} holds {type(config).__name__}, expected a JSON object")
    return tensors, config
