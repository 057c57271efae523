"""Every ```python block of README.md runs as written, in a temporary folder.

A snippet uses names it does not define (``data``, ``weight``, ``model``, ``loader`` ...): the
fixture of its section gives them, with small real models and data that fit what the README
says they are. A new snippet without a fixture fails here, naming its section: add one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qcal_export as qe

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^## ([^\n]+)$|^```python\n(.*?)^```", re.M | re.S)
"""A section heading (group 1) or a Python block (group 2)."""


def snippets() -> list[tuple[str, str]]:
    """(``<section> #<n>``, code) of every ```python block, ``n`` counting from 1 per section."""
    found, section, counts = [], "", {}
    for match in BLOCK.finditer(README.read_text()):
        if match.group(1) is not None:
            section = match.group(1).strip()
            continue
        counts[section] = counts.get(section, 0) + 1
        found.append((f"{section} #{counts[section]}", match.group(2)))
    return found


def input_ids_model(path: Path) -> None:
    """x -> MatMul -> Relu -> MatMul -> y with the float input named ``input_ids``: the README's
    first snippet reads that tensor's scales, as of a text model's first calibrated tensor."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (16, 32)), ("w2", (32, 8)))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input_ids", "w1"], ["h"], "mm1"),
            helper.make_node("Relu", ["h"], ["r"], "relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2"),
        ],
        "readme",
        [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)


def python_api(folder: Path) -> dict[str, Any]:
    """model.onnx in ``folder`` and ``data``: 8 batches of 4."""
    input_ids_model(folder / "model.onnx")
    rng = np.random.default_rng(1)
    return {"data": [{"input_ids": rng.standard_normal((4, 16)).astype(np.float32)}] * 8}


def calibrators(folder: Path) -> dict[str, Any]:
    """A ``[C, K]`` weight and ``other``, a calibrator of the same kind and shape to merge into."""
    weight = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    return {"weight": weight, "other": qe.MseCalibrator(qe.INT8, qe.PerAxis(0))}


class Query(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        setattr(self, "self", Query())  # noqa: B010 (``self`` as a module name, as in BERT)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([Layer()])


class TinyBert(nn.Module):
    """Embedding -> ``encoder.layer.0.attention.self.query`` (Linear) -> masked mean -> head:
    the module names of a BERT, small enough to export in a test."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(50, 16)
        self.encoder = Encoder()
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = self.encoder.layer[0].attention.self.query
        hidden = torch.relu(query(self.embeddings(ids))) * mask.unsqueeze(-1)
        return self.head(hidden.sum(1) / mask.sum(1, keepdim=True))


def torch_models(folder: Path) -> dict[str, Any]:
    """``model`` (TinyBert), ``loader`` (4 batches as dicts of ``ids`` and ``mask``), one
    ``batch``, its ``ids`` and ``mask``, and ``recipe`` (the default: int8, max)."""
    torch.manual_seed(0)
    loader = [{"ids": torch.randint(0, 50, (2, 7)), "mask": torch.ones(2, 7)} for _ in range(4)]
    batch = loader[0]
    return {
        "model": TinyBert().eval(),
        "loader": loader,
        "batch": batch,
        "ids": batch["ids"],
        "mask": batch["mask"],
        "recipe": qe.Recipe(),
    }


FIXTURES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "Python #1": python_api,
    "Python #2": python_api,
    "Python #3": calibrators,
    "Torch models #1": torch_models,
}
"""The names each snippet uses but does not define, made in the snippet's folder."""

SNIPPETS = snippets()


def test_every_snippet_has_a_fixture():
    assert {name for name, _ in SNIPPETS} == set(FIXTURES), "README snippets changed"


@pytest.mark.parametrize(("name", "code"), SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_readme_snippet_runs(name, code, tmp_path, monkeypatch):
    if name not in FIXTURES:
        pytest.fail(f"README snippet {name!r} has no fixture in {Path(__file__).name}: add one")
    monkeypatch.chdir(tmp_path)
    namespace = FIXTURES[name](tmp_path)
    exec(compile(code, f"README.md ({name})", "exec"), namespace)
