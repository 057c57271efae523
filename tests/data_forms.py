"""Models and files the data-form tests share: an image model, a text model (built with
onnx.helper), image folders written with Pillow, and the bundled MiniLM tokenizer's directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from qcal_export.demo.texts import bundled_model_dir

VOCAB = 30522
"""The bundled all-MiniLM-L6-v2 tokenizer's vocabulary size."""


def tokenizer_dir() -> Path:
    """The local Hugging Face directory of all-MiniLM-L6-v2 (tokenizer.json, vocab.txt, ...)."""
    return bundled_model_dir()


def image_model(
    dims: list, dtype: int = TensorProto.FLOAT, layout: str = "nchw", channels: int = 3
) -> onnx.ModelProto:
    """x [dims] -> Conv(4 filters, 1x1) -> Relu -> y: one image input of ``layout``."""
    rng = np.random.default_rng(0)
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(rng.standard_normal((4, channels, 1, 1)).astype(np_type), "w")
    nodes = []
    source = "x"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], "to_nchw", perm=[0, 3, 1, 2]))
        source = "x_nchw"
    nodes += [
        helper.make_node("Conv", [source, "w"], ["c"], "conv"),
        helper.make_node("Relu", ["c"], ["y"], "relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "image",
        [helper.make_tensor_value_info("x", dtype, dims)],
        [helper.make_tensor_value_info("y", dtype, ["n", 4, "h", "w"])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def text_model(
    names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids"),
    dtype: int = TensorProto.INT64,
    seq: int | str = "seq",
) -> onnx.ModelProto:
    """Embedding lookup of input_ids -> MatMul -> y [batch, seq, 4], with the other ``names``
    (attention_mask, token_type_ids) feeding it too: every input is used."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((VOCAB, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], "embed"),
        helper.make_node("MatMul", ["emb", "w"], ["h"], "proj"),
    ]
    last = "h"
    for name in names[1:]:
        nodes += [
            helper.make_node("Cast", [name], [f"{name}_f"], f"cast_{name}", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{name}_f", "axis"], [f"{name}_u"], f"unsq_{name}"),
            helper.make_node("Add", [last, f"{name}_u"], [f"{last}_{name}"], f"add_{name}"),
        ]
        last = f"{last}_{name}"
    nodes.append(helper.make_node("Identity", [last], ["y"], "out"))
    axis = numpy_helper.from_array(np.array([-1], np.int64), "axis")
    graph = helper.make_graph(
        nodes,
        "text",
        [helper.make_tensor_value_info(n, dtype, ["batch", seq]) for n in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, 4])],
        [table, w, axis],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def write_images(directory: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    """Random RGB images of ``sizes`` (width, height), PNG and JPEG in turn, named in order."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = directory / f"img_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
