"""Calibration batches from a directory of images (PNG, JPEG), read with Pillow and prepared as
the model's image input takes them: resized, scaled to [0, 1], normalized, laid out.

Resize (``resize="crop"``, torchvision's ``Resize(size)`` + ``CenterCrop`` habit): scale the
image, bilinear, so that it covers H x W with its shorter side fitting, then cut the centred
H x W window; ``resize="stretch"`` resizes to H x W directly (aspect ratio not kept).
Then ``x = (pixel / 255 - mean) / std`` per channel, in RGB (or BGR) order, as [N, C, H, W]
(``nchw``) or [N, H, W, C] (``nhwc``), in the input's float dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcal_export.capture.batching import batch_size_for, numbered_batches, span
from qcal_export.capture.source import DataSource, InputSpec
from qcal_export.errors import DataError, RecipeError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
RESIZES = ("crop", "stretch")
FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


@dataclass(frozen=True)
class ImageOptions:
    """How images become the model's input. None: taken from the model (``input_size`` from
    its fixed H, W; ``layout`` from where its channel dim of 1 or 3 sits, else nchw).

    ``mean``/``std``: one value per channel (or one for all), applied after scaling to [0, 1].
    """

    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None
    channels: str = "rgb"
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.input_size is not None and (
            len(self.input_size) != 2 or any(int(s) < 1 for s in self.input_size)
        ):
            raise RecipeError(f"input_size (--input-size) must be H W >= 1, not {self.input_size}")
        for name, values in (("mean (--mean)", self.mean), ("std (--std)", self.std)):
            if len(values) not in (1, 3):
                raise RecipeError(f"{name} takes 1 or 3 values (one per channel), not {values}")
        if any(not s > 0 for s in self.std):
            raise RecipeError(f"std (--std) must be > 0 for every channel, not {self.std}")
        for name, value, allowed in (
            ("layout (--layout)", self.layout, (None, *LAYOUTS)),
            ("channels (--channels)", self.channels, CHANNEL_ORDERS),
            ("resize (--resize)", self.resize, RESIZES),
        ):
            if value not in allowed:
                raise RecipeError(
                    f"{name} must be one of {[a for a in allowed if a]}, not {value!r}"
                )


@dataclass(frozen=True)
class ImageInput:
    """The model input images feed, and how: [N, C, H, W] or [N, H, W, C] of ``dtype``."""

    name: str
    dtype: np.dtype
    layout: str
    channels: int
    size: tuple[int, int]


def image_files(directory: Path) -> list[Path]:
    """The directory's image files in name order; other files are left out with a log line."""
    entries = sorted(directory.iterdir())
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    others = [p.name for p in entries if p not in images]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        log.warning(
            "data directory %s: %d file(s) that are not %s images left out (%s)",
            directory,
            len(others),
            "/".join(IMAGE_SUFFIXES),
            shown,
        )
    return images


def open_images(
    directory: Path, options: ImageOptions, inputs: Sequence[InputSpec], batch_size: int | None
) -> DataSource:
    """The images of ``directory`` as batches for the model's one image input."""
    files = image_files(directory)
    if not files:
        raise DataError(f"data directory {directory} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    target = image_input(inputs, options, str(directory))
    size = batch_size_for([s for s in inputs if s.name == target.name], batch_size)
    spec = next(s for s in inputs if s.name == target.name)
    fixed = spec.dims is not None and spec.dims[0] is not None

    def make(index: int, chunk: Sequence[Path]) -> dict[str, np.ndarray]:
        where = f"batch {index} (files {span([p.name for p in chunk])})"
        images = [load_image(path, target, options, where) for path in chunk]
        return {target.name: np.stack(images).astype(target.dtype)}

    height, width = target.size
    return numbered_batches(
        files,
        size,
        make,
        f"{len(files)} images in {directory} ({height}x{width}, {target.layout})",
        whole=fixed,
    )


def image_input(inputs: Sequence[InputSpec], options: ImageOptions, where: str) -> ImageInput:
    """The model's image input (its only input: a rank-4 float tensor) and its layout, size and
    channel count, from the model and ``options``; DataError names what does not fit."""
    required = [s for s in inputs if not s.optional]
    if len(required) != 1:
        raise DataError(
            f"images in {where} feed one input, but the model has inputs "
            f"{[s.describe() for s in required]}: give .npz batches or --data-module"
        )
    (spec,) = required
    if spec.dtype not in FLOATS or (spec.dims is not None and len(spec.dims) != 4):
        raise DataError(
            f"images in {where} feed a rank-4 float input, but the model's input is "
            f"{spec.describe()}: give .npz batches or --data-module"
        )
    dims = spec.dims or (None,) * 4
    layout = options.layout or ("nhwc" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "nchw")
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    channels = 3 if c is None else c
    if channels not in (1, 3):
        hint = " (is it nhwc? pass --layout nhwc)" if layout == "nchw" else ""
        raise DataError(
            f"images in {where}: input {spec.describe()} read as {layout} has {channels} "
            f"channels; images give 1 (grayscale) or 3{hint}"
        )
    size = options.input_size
    if size is None:
        if h is None or w is None:
            raise DataError(
                f"images in {where}: input {spec.describe()} has no fixed height and width: "
                "pass --input-size H W"
            )
        size = (h, w)
    elif (h is not None and h != size[0]) or (w is not None and w != size[1]):
        raise DataError(
            f"--input-size {size[0]} {size[1]}, but input {spec.describe()} read as {layout} "
            f"is {h}x{w}: pass --input-size {h} {w} (or check --layout)"
        )
    for name, values in (("mean", options.mean), ("std", options.std)):
        if len(values) not in (1, channels):
            raise DataError(f"--{name} has {len(values)} values; the input has {channels} channels")
    return ImageInput(spec.name, spec.dtype, layout, channels, (int(size[0]), int(size[1])))


UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, EOFError)
"""What Pillow raises on a file it cannot decode: unidentified, truncated, a broken PNG chunk
(SyntaxError), a decompression bomb (an Exception of its own, caught by name below)."""


def load_image(path: Path, target: ImageInput, options: ImageOptions, where: str) -> np.ndarray:
    """One image as the input takes it: [C, H, W] (nchw) or [H, W, C] (nhwc), float32."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if target.channels == 1 else "RGB")
    except (*UNREADABLE_IMAGE, Image.DecompressionBombError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{where}: cannot read image {path}: {text}") from None
    image = resized(image, target.size, options.resize)
    pixels = np.asarray(image, dtype=np.float32).reshape(*target.size, target.channels) / 255.0
    if options.channels == "bgr":
        pixels = pixels[..., ::-1]
    pixels = (pixels - np.asarray(options.mean, np.float32)) / np.asarray(options.std, np.float32)
    return pixels.transpose(2, 0, 1) if target.layout == "nchw" else pixels


def resized(image, size: tuple[int, int], how: str):
    """``image`` (a PIL image) as ``size`` (H, W): scaled to cover it and centre-cropped
    (``crop``), or scaled to it (``stretch``); bilinear either way."""
    from PIL import Image

    height, width = size
    if how == "stretch":
        return image.resize((width, height), Image.BILINEAR)
    scale = max(height / image.height, width / image.width)
    new_w = max(width, round(image.width * scale))
    new_h = max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    return image.crop((left, top, left + width, top + height))
