"""Image folders as calibration batches: each batch equals a numpy reference of the same
preprocessing (Pillow's bilinear resize to hand-computed sizes, centre crop, [0, 1], mean/std,
layout), and every misfit (unreadable image, wrong layout, several inputs) is one DataError."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from data_forms import image_model, save, write_images
from onnx import TensorProto
from PIL import Image

from qcal_export.capture.data import model_inputs, open_data, select_batches
from qcal_export.capture.images import ImageOptions
from qcal_export.errors import DataError, RecipeError
from qcal_export.pipeline.calibrate import calibrate_onnx

SIZES = [(20, 10), (8, 8), (10, 30), (5, 4), (12, 9)]
"""(width, height) of the test images; below, the size each is resized to for 8 x 8 with
``crop`` (shorter side to 8) and the window cut: computed by hand."""
RESIZED = [(16, 8), (8, 8), (8, 24), (10, 8), (11, 8)]
WINDOWS = [(4, 0), (0, 0), (0, 8), (1, 0), (2, 0)]  # round(1.5) == 2, as torchvision's crop
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference(path, resized, window, mean=MEAN, std=STD, bgr=False, layout="nchw"):
    """The float64 reference of one image's preprocessing."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize(resized, Image.BILINEAR)
    left, top = window
    x = np.asarray(image.crop((left, top, left + 8, top + 8)), np.float64) / 255.0
    x = x[..., ::-1] if bgr else x
    x = (x - np.asarray(mean)) / np.asarray(std)
    return x.transpose(2, 0, 1) if layout == "nchw" else x


def source(tmp_path, model, options=None, batch_size=None, data=None):
    inputs = model_inputs(model)
    return open_data(
        data or tmp_path / "images", batch_size=batch_size, options=options, inputs=lambda: inputs
    )


def test_batches_equal_the_reference_preprocessing_nchw_rgb(tmp_path):
    paths = write_images(tmp_path / "images", SIZES)
    model = image_model(["batch", 3, 8, 8])
    batches = list(source(tmp_path, model, ImageOptions(mean=MEAN, std=STD), 2).batches())
    assert [b["x"].shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    got = np.concatenate([b["x"] for b in batches])
    assert got.dtype == np.float32
    want = np.stack([reference(*args) for args in zip(paths, RESIZED, WINDOWS, strict=True)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_nhwc_bgr_float16_and_stretch(tmp_path):
    paths = write_images(tmp_path / "images", SIZES[:3])
    model = image_model([1, 8, 8, 3], TensorProto.FLOAT16, layout="nhwc")
    options = ImageOptions(mean=(0.5,), std=(0.25,), channels="bgr", resize="stretch")
    batches = list(source(tmp_path, model, options).batches())
    assert len(batches) == 3  # the model's fixed batch of 1
    assert all(b["x"].dtype == np.float16 and b["x"].shape == (1, 8, 8, 3) for b in batches)
    for batch, path in zip(batches, paths, strict=True):
        want = reference(path, (8, 8), (0, 0), (0.5,) * 3, (0.25,) * 3, bgr=True, layout="nhwc")
        np.testing.assert_allclose(batch["x"][0].astype(np.float64), want, atol=4e-3)


def test_grayscale_model_reads_images_as_luminance(tmp_path):
    paths = write_images(tmp_path / "images", [(8, 8)])
    (batch,) = source(tmp_path, image_model(["n", 1, 8, 8], channels=1)).batches()
    with Image.open(paths[0]) as image:
        want = np.asarray(image.convert("L"), np.float32) / 255.0
    np.testing.assert_allclose(batch["x"][0, 0], want, atol=1e-6)


def test_input_size_comes_from_the_option_where_the_model_has_none(tmp_path):
    write_images(tmp_path / "images", [(20, 10)])
    model = image_model(["n", 3, "h", "w"])
    (batch,) = source(tmp_path, model, ImageOptions(input_size=(8, 8))).batches()
    assert batch["x"].shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=r"no fixed height and width: pass --input-size H W"):
        source(tmp_path, model)


def test_fixed_batch_leaves_out_a_partial_last_batch_with_a_log_line(tmp_path, caplog):
    write_images(tmp_path / "images", SIZES)
    with caplog.at_level(logging.WARNING):
        batches = list(source(tmp_path, image_model([2, 3, 8, 8])).batches())
    assert len(batches) == 2
    assert "the last 1 item(s) do not fill a batch of 2" in caplog.text
    with pytest.raises(DataError, match=r"--batch-size 3, but .* batches of 2 .* --batch-size 2"):
        source(tmp_path, image_model([2, 3, 8, 8]), batch_size=3)


def test_other_files_are_left_out_with_a_log_line(tmp_path, caplog):
    write_images(tmp_path / "images", SIZES[:2])
    (tmp_path / "images" / "labels.csv").write_text("a,1\n")
    with caplog.at_level(logging.WARNING):
        batches = list(source(tmp_path, image_model(["n", 3, 8, 8])).batches())
    assert len(batches) == 1 and batches[0]["x"].shape[0] == 2
    assert "1 file(s) that are not .png/.jpg/.jpeg images left out (labels.csv)" in caplog.text


def test_unreadable_image_names_its_batch_and_file_and_only_read_batches_fail(tmp_path):
    write_images(tmp_path / "images", SIZES)
    broken = tmp_path / "images" / "img_03.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    (tmp_path / "images" / "img_04.png").write_text("not a png")
    data = source(tmp_path, image_model(["n", 3, 8, 8]), batch_size=2)
    with pytest.raises(DataError, match=r"batch 1 \(files img_02.png..img_03.jpg\): cannot read "):
        list(data.batches())
    first = select_batches(data, lambda i: i == 0, "first")
    assert len(list(first.batches())) == 1  # batches 1 and 2 never opened
    with pytest.raises(DataError, match=r"batch 2 \(files img_04.png\): cannot read image .*"):
        list(select_batches(data, lambda i: i == 2, "last").batches())


@pytest.mark.parametrize(
    ("dims", "dtype", "options", "message"),
    [
        ([1, 8, 8, 3], TensorProto.FLOAT, ImageOptions(layout="nchw"), r"read as nchw has 8 "),
        (["n", 3, 8, 8], TensorProto.FLOAT, ImageOptions(layout="nhwc"), r"read as nhwc has 8 "),
        (["n", 3, 8, 8], TensorProto.FLOAT, ImageOptions(input_size=(9, 8)), r"is 8x8: pass"),
        (["n", 3, 8, 8], TensorProto.INT64, None, r"feed a rank-4 float input.*int64"),
        (["n", 3, 8], TensorProto.FLOAT, None, r"feed a rank-4 float input"),
        (["n", 3, 8, 8], TensorProto.FLOAT, ImageOptions(mean=(0.1, 0.2, 0.3)), None),
    ],
)
def test_inputs_that_images_do_not_fit(tmp_path, dims, dtype, options, message):
    write_images(tmp_path / "images", [(8, 8)])
    model = image_model(dims, dtype, channels=3)
    if message is None:
        model = image_model(["n", 1, 8, 8], channels=1)
        message = r"--mean has 3 values; the input has 1 channels"
    with pytest.raises(DataError, match=message):
        source(tmp_path, model, options)


def test_a_model_with_several_inputs_is_named(tmp_path):
    from data_forms import text_model

    write_images(tmp_path / "images", [(8, 8)])
    with pytest.raises(DataError, match=r"feed one input, but the model has inputs .*input_ids"):
        source(tmp_path, text_model())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"std": (0.0,)}, r"std \(--std\) must be > 0"),
        ({"mean": (0.1, 0.2)}, r"mean \(--mean\) takes 1 or 3 values"),
        ({"layout": "chw"}, r"layout \(--layout\) must be one of \['nchw', 'nhwc'\]"),
        ({"input_size": (0, 8)}, r"input_size \(--input-size\) must be H W >= 1"),
    ],
)
def test_options_are_checked_when_made(fields, message):
    with pytest.raises(RecipeError, match=message):
        ImageOptions(**fields)


def test_image_options_for_npz_data_are_refused(tmp_path, workdir):
    with pytest.raises(DataError, match=r"images options were given .* holds no images"):
        source(tmp_path, image_model(["n", 3, 8, 8]), ImageOptions(), data=workdir / "data")


def test_calibrate_onnx_on_an_image_folder_takes_the_input_range_of_the_reference(tmp_path):
    paths = write_images(tmp_path / "images", SIZES)
    model = save(image_model(["batch", 3, 8, 8]), tmp_path / "model.onnx")
    result = calibrate_onnx(
        model,
        tmp_path / "images",
        data_options=ImageOptions(mean=MEAN, std=STD),
        batch_size=2,
        output=tmp_path / "q.onnx",
    )
    want = max(np.abs(reference(*a)).max() for a in zip(paths, RESIZED, WINDOWS, strict=True))
    assert result.scales["x"].amax.item() == pytest.approx(want, rel=1e-6)
    assert result.report["batches_per_pass"] == [3]
    assert result.report["output_error"]["y"]["cosine"] > 0.99
