"""Text files and folders as calibration batches: each batch equals the bundled MiniLM
tokenizer called directly on the same texts; the model's input names and integer dtype decide
what is fed; misfits are one DataError."""

from __future__ import annotations

import numpy as np
import pytest
from data_forms import save, text_model, tokenizer_dir
from onnx import TensorProto
from transformers import AutoTokenizer

from qcal_export.capture.data import model_inputs, open_data, select_batches
from qcal_export.capture.texts import TextOptions
from qcal_export.errors import DataError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx

TEXTS = [
    "Quantization maps floating point values to a small set of integers.",
    "A short one.",
    "Calibration runs representative data through the model and records every range.",
    "Déjà vu: non-ASCII text is tokenized too.",
    "Five.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)


def text_file(tmp_path, texts=TEXTS):
    path = tmp_path / "texts.txt"
    path.write_text("\n\n".join(texts) + "\n   \n", encoding="utf-8")  # blank lines skipped
    return path


def source(model, data, options=None, batch_size=None):
    inputs = model_inputs(model)
    options = options or TextOptions(tokenizer_dir())
    return open_data(data, batch_size=batch_size, options=options, inputs=lambda: inputs)


def test_text_file_batches_equal_the_tokenizer_called_directly(tmp_path, tokenizer):
    batches = list(source(text_model(), text_file(tmp_path), batch_size=2).batches())
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        want = tokenizer(TEXTS[2 * i : 2 * i + 2], padding="longest", return_tensors="np")
        assert sorted(batch) == ["attention_mask", "input_ids", "token_type_ids"]
        for name, array in batch.items():
            assert array.dtype == np.int64
            np.testing.assert_array_equal(array, want[name])


def test_folder_of_txt_files_int32_inputs_and_only_the_inputs_the_model_has(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(TEXTS[:3]):
        (folder / f"doc_{i}.txt").write_text(text + "\n", encoding="utf-8")
    model = text_model(("input_ids", "attention_mask"), TensorProto.INT32)
    (batch,) = source(model, folder).batches()
    want = tokenizer(TEXTS[:3], padding="longest", return_tensors="np")
    assert sorted(batch) == ["attention_mask", "input_ids"]
    assert batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], want["attention_mask"])


def test_max_length_truncates_and_a_fixed_length_pads_to_it(tmp_path, tokenizer):
    path = text_file(tmp_path)
    (batch,) = source(text_model(), path, TextOptions(tokenizer_dir(), 6), 8).batches()
    want = tokenizer(TEXTS, padding="longest", truncation=True, max_length=6, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
    assert batch["input_ids"].shape == (5, 6)
    (batch,) = source(text_model(seq=16), path, batch_size=8).batches()
    want = tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="np"
    )
    np.testing.assert_array_equal(batch["attention_mask"], want["attention_mask"])
    with pytest.raises(DataError, match=r"--max-length 6, but .* sequences of 16"):
        source(text_model(seq=16), path, TextOptions(tokenizer_dir(), 6))


def test_selected_batches_name_their_lines(tmp_path):
    path = text_file(tmp_path)
    data = source(text_model(), path, batch_size=2)
    kept = list(select_batches(data, lambda i: i == 1, "second").pairs())
    assert [i for i, _ in kept] == [1]
    assert "5 texts in" in data.description
    path.write_bytes(b"fine\n\xff\xfe broken utf-8\n")
    data = source(text_model(), path, batch_size=1)
    with pytest.raises(DataError, match=r"batch 1 \(lines 2..2 of texts.txt\): cannot read text"):
        list(data.batches())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: TextOptions(p / "nowhere"), r"tokenizer directory .*nowhere \(--tokenizer\) "),
        (lambda p: TextOptions(p), r"cannot load a tokenizer from .* save_pretrained"),
    ],
)
def test_a_missing_or_empty_tokenizer_directory_is_named(tmp_path, make, message):
    path = text_file(tmp_path)
    with pytest.raises(DataError, match=message):
        source(text_model(), path, make(tmp_path))


def test_models_that_texts_do_not_fit(tmp_path):
    from data_forms import image_model

    path = text_file(tmp_path)
    with pytest.raises(DataError, match=r"feed \['input_ids', .* inputs \['x float32"):
        source(image_model(["n", 3, 8, 8]), path)
    with pytest.raises(DataError, match=r"input input_ids float32\[\?, \?\] is not an integer"):
        source(text_model(dtype=TensorProto.FLOAT), path)


def test_empty_text_file_and_text_without_tokenizer(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match=r"holds no text"):
        source(text_model(), empty)
    inputs = model_inputs(text_model())
    with pytest.raises(DataError, match=r"holds texts: pass --tokenizer DIR"):
        open_data(text_file(tmp_path), inputs=lambda: inputs)
    with pytest.raises(RecipeError, match=r"max_length \(--max-length\) must be >= 2"):
        TextOptions(tokenizer_dir(), 1)


def test_calibrate_onnx_on_a_text_file(tmp_path, tokenizer):
    model = save(text_model(), tmp_path / "model.onnx")
    result = calibrate_onnx(
        model,
        text_file(tmp_path),
        data_options=TextOptions(tokenizer_dir()),
        batch_size=2,
        output=tmp_path / "q.onnx",
        target="tensorrt",
    )
    assert result.report["batches_per_pass"] == [3]
    ids = tokenizer(TEXTS, padding="longest", return_tensors="np")["input_ids"]
    table = np.random.default_rng(0).standard_normal((30522, 8)).astype(np.float32)
    assert result.scales["emb"].amax.item() == pytest.approx(np.abs(table[ids]).max(), rel=1e-6)
    assert (tmp_path / "q.onnx").is_file()


def test_batches_equal_the_demo_tokenization_with_the_tokenizers_library(tmp_path):
    """A second oracle: the demo's own batches (``tokenizers`` directly, tokenizer.json)."""
    from qcal_export.demo.texts import demo_batches

    got = list(
        source(text_model(), text_file(tmp_path), TextOptions(tokenizer_dir(), 128), 2).batches()
    )
    want = demo_batches(TEXTS, batch_size=2, max_length=128)
    for a, b in zip(got, want, strict=True):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
