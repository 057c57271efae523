"""Real ONNX models shipped in PyPI packages (Apache-2.0) and data in the form each one takes:
rapidocr-onnxruntime's PaddleOCR text detector and recognizer (paddle2onnx exports, weights in
Constant nodes) and magika's file-type classifier (a jax2tf export).

``model_path(package, relative)`` finds a model without importing the package (rapidocr's
import needs OpenCV); ``ocr_pages``, ``ocr_crops`` and ``magika_features`` build input batches.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
VOCABULARY = (
    "invoice total amount due 2026 quantization calibrate model export ONNX runtime scale Hello"
    " World 42 kilograms Tuesday Paris 17:45 release notes section table figure"
)
WORDS = VOCABULARY.split()
DETECTOR = ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
RECOGNIZER = ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")
MAGIKA = ("magika", "models/standard_v3_3/model.onnx")


def model_path(package: str, relative: str) -> Path | None:
    """The file ``relative`` inside installed ``package``, or None where either is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(FONT, size) if Path(FONT).is_file() else ImageFont.load_default(size)


def _paddle_norm(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> float32 ``[3, h, w]`` scaled as rapidocr does: (x/255 - 0.5)/0.5."""
    return ((rgb.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def ocr_pages(rng: np.random.Generator, count: int, size: int = 320) -> np.ndarray:
    """Pages of dark text lines on light paper, ``[count, 3, size, size]`` for the detector."""
    pages = []
    for _ in range(count):
        page = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(215, 256, 3)))
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(4, 20))
        while y < size - 30:
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
            font = _font(int(rng.integers(14, 26)))
            ink = tuple(int(v) for v in rng.integers(0, 80, 3))
            draw.text((int(rng.integers(4, 60)), y), text, fill=ink, font=font)
            y += int(rng.integers(28, 52))
        pages.append(_paddle_norm(np.asarray(page)))
    return np.stack(pages)


def ocr_crops(rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
    """Single text lines at the recognizer's height, ``[count, 3, 48, 320]``, and their texts."""
    crops, texts = [], []
    for _ in range(count):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 3))))
        font = _font(int(rng.integers(26, 34)))
        width = min(320, int(draw_width(text, font)) + 16)
        line = Image.new("RGB", (width, 48), (245, 245, 240))
        ImageDraw.Draw(line).text((8, 6), text, fill=(20, 20, 20), font=font)
        padded = np.zeros((48, 320, 3), np.uint8)
        padded[:, :width] = np.asarray(line)
        crop = _paddle_norm(padded)
        crop[:, :, width:] = 0.0
        crops.append(crop)
        texts.append(text)
    return np.stack(crops), texts


def draw_width(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    """Rendered width of ``text`` in pixels."""
    left, _, right, _ = font.getbbox(text)
    return right - left


def ctc_characters(model_file: Path) -> list[str]:
    """The recognizer's alphabet as rapidocr builds it: blank, the model's ``character``
    metadata lines, then a space."""
    meta = {p.key: p.value for p in onnx.load(model_file, load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, alphabet: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, repeats merged, blanks dropped. ``probs`` ``[b, t, c]``."""
    texts = []
    for best in probs.argmax(-1):
        keep = np.r_[True, best[1:] != best[:-1]] & (best != 0)
        texts.append("".join(alphabet[i] for i in best[keep]))
    return texts


def char_agreement(reference: list[str], other: list[str]) -> float:
    """1 - total edit distance / total reference length: character agreement of two decodings."""
    distance = sum(_edit_distance(a, b) for a, b in zip(reference, other, strict=True))
    return 1.0 - distance / max(1, sum(len(a) for a in reference))


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def magika_features(path: Path, size: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray:
    """magika's v3 input for one file, ``[2 * size]`` int32: the first ``size`` bytes of the
    first ``block`` (left-stripped of whitespace) then the last ``size`` of the last ``block``
    (right-stripped), padded with ``pad``; a file no longer than ``block`` is stripped both ways.
    """
    data = path.read_bytes()
    short = len(data) <= block
    beg = data[:block].strip() if short else data[:block].lstrip()
    end = data[-block:].strip() if short else data[-block:].rstrip()
    beg_ints = list(beg[:size]) + [pad] * (size - len(beg[:size]))
    end_ints = [pad] * (size - len(end[-size:])) + list(end[-size:])
    return np.asarray(beg_ints + end_ints, np.int32)


def magika_files(count: int) -> list[Path]:
    """``count`` real files of mixed kinds from this machine (Python sources, compiled modules,
    shared libraries, JSON, text), in a fixed order."""
    import json
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pools = [
        sorted(stdlib.glob("*.py")),
        sorted(stdlib.glob("lib-dynload/*.so")),
        sorted(Path(json.__file__).parent.parent.glob("**/*.json"))[:200],
        sorted(stdlib.glob("**/*.txt"))[:200],
        sorted(stdlib.glob("**/*.pyc"))[:200],
        sorted(stdlib.glob("**/*.html"))[:200],
    ]
    pools = [pool for pool in pools if pool]
    files = []
    for i in range(count):
        pool = pools[i % len(pools)]
        files.append(pool[(i * 7919) % len(pool)])
    return files


def write_batches(root: Path, name: str, array: np.ndarray, batch: int) -> Path:
    """``array`` cut into .npz batches of ``batch`` rows under ``root`` (input ``name``)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(array), batch):
        np.savez(root / f"batch_{i // batch:03d}.npz", **{name: array[i : i + batch]})
    return root
