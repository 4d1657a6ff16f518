"""The torch-free inferencers: loading exports, decoding inputs, batching, sources, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_deploy.errors import ArtefactError, DeployError, InputError, OptionError
from anomaly_deploy.inference import (
    Inferencer,
    OnnxInferencer,
    OpenVINOInferencer,
    Prediction,
    TorchInferencer,
    load_inferencer,
)

CLASSES = {"onnx": OnnxInferencer, "openvino": OpenVINOInferencer, "torch": TorchInferencer}


def _assert_prediction(prediction: Prediction, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    assert prediction.anomaly_map.shape == (height, width)
    assert prediction.anomaly_map.dtype == np.float32
    assert prediction.pred_mask.shape == (height, width)
    assert prediction.pred_mask.dtype == bool
    np.testing.assert_array_equal(prediction.pred_mask, prediction.anomaly_map >= 0.5)
    assert prediction.pred_label == (prediction.pred_score >= 0.5)
    assert isinstance(prediction.pred_score, float)
    assert isinstance(prediction.pred_label, bool)
    np.testing.assert_array_equal(prediction.image, image)


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- loading ----------------------------------------------------------------------------


def test_load_inferencer_picks_the_class_of_the_format(export_folder):
    fmt, folder = export_folder
    inferencer = load_inferencer(folder)
    assert type(inferencer) is CLASSES[fmt]
    assert inferencer.metadata["format"] == fmt
    assert inferencer.input_size == (32, 32)
    assert inferencer.folder == folder
    # The model file itself is accepted too.
    by_file = load_inferencer(folder / inferencer.metadata["model_file"])
    assert type(by_file) is CLASSES[fmt]
    assert fmt in repr(inferencer).lower() or CLASSES[fmt].__name__ in repr(inferencer)


def test_plugin_targets_resolve_to_these_classes():
    from anomaly import get_plugin_manager

    pm = get_plugin_manager()
    for fmt, cls in CLASSES.items():
        assert pm.inferencer(fmt).load() is cls


# --- predictions ------------------------------------------------------------------------


def test_predict_a_file_matches_the_torch_module(export_folder, image_folder, helpers):
    _, folder = export_folder
    inferencer = load_inferencer(folder)
    path = image_folder / "bad" / "001.png"
    image = np.asarray(Image.open(path).convert("RGB"))
    prediction = inferencer.predict(path)
    _assert_prediction(prediction, image)
    assert prediction.source == str(path)
    score, anomaly_map = helpers.reference(image)
    assert prediction.pred_score == pytest.approx(score, abs=1e-5)
    np.testing.assert_allclose(prediction.anomaly_map, anomaly_map, atol=1e-5)
    # The right half is bright: anomalous pixels there, none on the dark left.
    assert prediction.pred_mask[:, 40:].all()
    assert not prediction.pred_mask[:, :24].any()


def test_the_three_runtimes_agree(onnx_export, openvino_export, torch_export, image_folder):
    results = {
        folder.name: list(load_inferencer(folder).predict_source(image_folder, batch_size=2))
        for folder in (onnx_export, openvino_export, torch_export)
    }
    first, *others = results.values()
    for other in others:
        assert [p.source for p in other] == [p.source for p in first]
        for a, b in zip(first, other, strict=True):
            assert a.pred_score == pytest.approx(b.pred_score, abs=1e-5)
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5)


def test_normal_and_anomalous_images_are_told_apart(onnx_export, image_folder):
    predictions = list(load_inferencer(onnx_export).predict_source(image_folder))
    labels = {
        Path(p.source).relative_to(image_folder).as_posix(): p.pred_label for p in predictions
    }
    assert labels == {
        "bad/000.png": True,
        "bad/001.png": True,
        "good/000.png": False,
        "good/001.png": False,
        "good/002.png": False,
    }


def test_arrays_of_every_layout_become_rgb(onnx_export, helpers):
    inferencer = load_inferencer(onnx_export)
    rgb = helpers.make_image(0.7, (20, 30))
    gray = rgb[..., 0]
    expected_gray = np.repeat(gray[..., None], 3, axis=2)
    alpha = np.full((20, 30, 1), 128, dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)

    assert inferencer.predict(rgb).source == "array"
    np.testing.assert_array_equal(inferencer.predict(gray).image, expected_gray)
    np.testing.assert_array_equal(inferencer.predict(gray[..., None]).image, expected_gray)
    sixteen = gray.astype(np.uint16) * 257  # the same brightness at 16 bits
    np.testing.assert_array_equal(inferencer.predict(sixteen).image, expected_gray)
    # Alpha is composited onto black, as the training data path does.
    composited = inferencer.predict(rgba).image
    np.testing.assert_allclose(composited, np.round(rgb * (128 / 255)), atol=1)
    # Encoded bytes, as an upload would bring them.
    import io

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    from_bytes = inferencer.predict(buffer.getvalue())
    np.testing.assert_array_equal(from_bytes.image, rgb)
    assert from_bytes.source == "bytes"


def test_sixteen_bit_and_exif_rotated_files_decode_like_training(onnx_export, tmp_path, helpers):
    inferencer = load_inferencer(onnx_export)
    values = np.linspace(0, 65535, 24 * 16, dtype=np.uint16).reshape(24, 16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = inferencer.predict(tmp_path / "deep.png").image
    assert image.shape == (24, 16, 3)
    assert image[0, 0, 0] == 0
    assert image[-1, -1, 0] == 255
    # EXIF orientation 6: stored landscape, shown (and scored) portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(helpers.make_image(0.4, (20, 30))).save(tmp_path / "phone.jpg", exif=exif)
    assert inferencer.predict(tmp_path / "phone.jpg").image.shape == (30, 20, 3)


def test_same_size_batches_equal_single_predictions(onnx_export, helpers):
    inferencer = load_inferencer(onnx_export)
    images = [helpers.make_image(b, (40, 56), seed=i) for i, b in enumerate((0.2, 0.6, 0.9))]
    batch = inferencer.predict_batch(images)
    assert [p.source for p in batch] == ["array:0", "array:1", "array:2"]
    for image, prediction in zip(images, batch, strict=True):
        single = inferencer.predict(image)
        assert prediction.pred_score == pytest.approx(single.pred_score, abs=1e-6)
        np.testing.assert_allclose(prediction.anomaly_map, single.anomaly_map, atol=1e-6)
    assert inferencer.predict_batch([]) == []


def test_mixed_sizes_are_resized_on_the_host_and_mapped_back(onnx_export, helpers):
    inferencer = load_inferencer(onnx_export)
    images = [
        helpers.make_image(0.3, (40, 56)),
        helpers.make_half_bright((64, 48)),
        helpers.make_image(0.8, (32, 32)),
    ]
    batch = inferencer.predict_batch(images)
    for image, prediction in zip(images, batch, strict=True):
        _assert_prediction(prediction, image)
        single = inferencer.predict(image)
        # Pillow's resize on the host and torch's in the graph differ by rounding only.
        assert prediction.pred_score == pytest.approx(single.pred_score, abs=0.01)
        np.testing.assert_allclose(prediction.anomaly_map, single.anomaly_map, atol=0.05)
        assert prediction.pred_label == single.pred_label


def test_mixed_sizes_without_an_input_size_run_one_call_per_size(onnx_export, tmp_path, helpers):
    folder = tmp_path / "export"
    shutil.copytree(onnx_export, folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["input"]["height"] = metadata["input"]["width"] = 0
    (folder / "metadata.json").write_text(json.dumps(metadata))
    inferencer = load_inferencer(folder)
    assert inferencer.input_size is None
    images = [helpers.make_image(0.3, (40, 56)), helpers.make_image(0.8, (32, 32))] * 2
    batch = inferencer.predict_batch(images)
    for image, prediction in zip(images, batch, strict=True):
        single = inferencer.predict(image)
        assert prediction.pred_score == pytest.approx(single.pred_score, abs=1e-6)
        np.testing.assert_allclose(prediction.anomaly_map, single.anomaly_map, atol=1e-6)


# --- sources ----------------------------------------------------------------------------


def test_a_folder_is_searched_recursively_and_sorted(onnx_export, image_folder):
    inferencer = load_inferencer(onnx_export)
    stream = inferencer.predict_source(image_folder, batch_size=2)
    assert stream.total == 5
    sources = [Path(p.source).relative_to(image_folder).as_posix() for p in stream]
    assert sources == ["bad/000.png", "bad/001.png", "good/000.png", "good/001.png", "good/002.png"]
    one_by_one = [p.pred_score for p in inferencer.predict_source(image_folder, batch_size=1)]
    assert one_by_one == pytest.approx(
        [p.pred_score for p in inferencer.predict_source(image_folder, batch_size=8)], abs=1e-6
    )


def test_a_single_file_source(onnx_export, image_folder):
    stream = load_inferencer(onnx_export).predict_source(str(image_folder / "good" / "000.png"))
    assert stream.total == 1
    assert [p.source for p in stream] == [str(image_folder / "good" / "000.png")]


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_a_video_file_yields_rgb_frames(onnx_export, tmp_path, helpers, suffix):
    frames = [helpers.make_image(0.15 if i < 3 else 0.85, (48, 64), seed=i) for i in range(6)]
    video = helpers.write_video(tmp_path / f"clip{suffix}", frames)
    stream = load_inferencer(onnx_export).predict_source(video, batch_size=4)
    assert stream.total == 6
    predictions = list(stream)
    assert [p.source for p in predictions] == [f"frame:{i}" for i in range(6)]
    assert [p.pred_label for p in predictions] == [False] * 3 + [True] * 3
    for frame, prediction in zip(frames, predictions, strict=True):
        assert prediction.image.shape == (48, 64, 3)
        # Lossy codecs: the decoded frame is close to what was written, channels in RGB order.
        assert abs(float(prediction.image.mean()) - float(frame.mean())) < 8


def test_a_video_with_coloured_frames_is_converted_from_bgr(onnx_export, tmp_path, helpers):
    red = np.zeros((48, 64, 3), dtype=np.uint8)
    red[..., 0] = 220
    video = helpers.write_video(tmp_path / "red.avi", [red, red])
    prediction = next(iter(load_inferencer(onnx_export).predict_source(video)))
    assert prediction.image[..., 0].mean() > 180
    assert prediction.image[..., 2].mean() < 40


def test_iterables_of_paths_and_arrays(onnx_export, image_folder, helpers):
    inferencer = load_inferencer(onnx_export)
    items = [image_folder / "good" / "000.png", helpers.make_image(0.9, (16, 16))]
    stream = inferencer.predict_source(items)
    assert stream.total == 2
    assert [p.source for p in stream] == [str(items[0]), "array:1"]
    generated = inferencer.predict_source(helpers.make_image(0.5, (8, 8), seed=i) for i in range(3))
    assert generated.total is None
    assert len(list(generated)) == 3
    single = inferencer.predict_source(helpers.make_image(0.5, (8, 8)))
    assert [p.source for p in single] == ["array"]


# --- errors -----------------------------------------------------------------------------


def test_missing_and_corrupt_exports_raise_artefact_errors(onnx_export, tmp_path):
    with pytest.raises(ArtefactError, match="does not exist") as error:
        load_inferencer(tmp_path / "nowhere")
    _one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtefactError, match=r"no metadata\.json"):
        load_inferencer(tmp_path / "empty")

    broken = tmp_path / "broken"
    shutil.copytree(onnx_export, broken)
    (broken / "metadata.json").write_text("{not json")
    with pytest.raises(ArtefactError, match="cannot be read") as error:
        load_inferencer(broken)
    _one_line(error)
    (broken / "metadata.json").write_text("[1, 2]")
    with pytest.raises(ArtefactError, match="no 'format' key"):
        load_inferencer(broken)
    (broken / "metadata.json").write_text(json.dumps({"format": "checkpoint"}))
    with pytest.raises(ArtefactError, match="--ckpt"):
        load_inferencer(broken)
    (broken / "metadata.json").write_text(json.dumps({"format": "tensorrt"}))
    with pytest.raises(ArtefactError, match="'tensorrt'"):
        load_inferencer(broken)
    metadata = json.loads((onnx_export / "metadata.json").read_text())
    metadata["input"]["height"] = "big"
    (broken / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ArtefactError, match="input size"):
        load_inferencer(broken)


def test_a_missing_model_file_and_a_wrong_class(onnx_export, openvino_export, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_export, folder)
    (folder / "model.onnx").unlink()
    with pytest.raises(ArtefactError, match=r"lacks its model file 'model\.onnx'"):
        load_inferencer(folder)
    with pytest.raises(ArtefactError, match="holds a 'openvino' export, not 'onnx'"):
        OnnxInferencer(openvino_export)


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torch"])
def test_a_corrupt_model_file_raises_an_artefact_error(fmt, tmp_path, request):
    source = request.getfixturevalue(f"{fmt}_export")
    folder = tmp_path / fmt
    shutil.copytree(source, folder)
    model_file = folder / json.loads((folder / "metadata.json").read_text())["model_file"]
    model_file.write_bytes(b"\x00garbage" * 16)
    with pytest.raises(ArtefactError, match="cannot load") as error:
        load_inferencer(folder)
    _one_line(error)


def test_bad_devices_and_options_raise_option_errors(export_folder):
    _fmt, folder = export_folder
    with pytest.raises(OptionError, match="device") as error:
        load_inferencer(folder, device="TPU")
    _one_line(error)
    with pytest.raises(OptionError, match="bad option"):
        load_inferencer(folder, no_such_option=1)
    inferencer = load_inferencer(folder)
    with pytest.raises(OptionError, match="batch_size"):
        inferencer.predict_source(np.zeros((4, 4, 3), np.uint8), batch_size=0)


def test_runtime_options(onnx_export, openvino_export, image_folder):
    onnx = OnnxInferencer(onnx_export, num_threads=1)
    assert type(load_inferencer(onnx_export, num_threads=1)) is OnnxInferencer
    assert onnx.num_threads == 1
    with pytest.raises(OptionError, match="num_threads"):
        OnnxInferencer(onnx_export, num_threads=0)
    throughput = OpenVINOInferencer(openvino_export, performance_hint="throughput")
    latency = OpenVINOInferencer(openvino_export)
    path = image_folder / "bad" / "001.png"
    assert throughput.predict(path).pred_score == pytest.approx(latency.predict(path).pred_score)
    with pytest.raises(OptionError, match="performance_hint"):
        OpenVINOInferencer(openvino_export, performance_hint="fast")


def test_bad_inputs_raise_one_line_input_errors(onnx_export, tmp_path):
    inferencer = load_inferencer(onnx_export)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "broken.avi").write_bytes(b"RIFF????AVI garbage")
    cases = [
        (lambda: inferencer.predict(tmp_path / "corrupt.png"), "cannot be read"),
        (lambda: inferencer.predict(tmp_path / "missing.png"), "does not exist"),
        (lambda: inferencer.predict_source(tmp_path / "empty"), "holds no images"),
        (lambda: inferencer.predict_source(tmp_path / "missing"), "does not exist"),
        (lambda: inferencer.predict_source(tmp_path / "broken.avi"), "cannot be opened"),
        (lambda: inferencer.predict_source("camera:97"), "camera 97 cannot be opened"),
        (lambda: inferencer.predict_source(97), "camera 97 cannot be opened"),
        (lambda: inferencer.predict_source(3.5), "cannot predict on a 'float'"),
        (lambda: inferencer.predict(np.zeros((4, 4), np.float32)), "dtype 'float32'"),
        (lambda: inferencer.predict(np.zeros((4, 4, 2), np.uint8)), "shape (4, 4, 2)"),
        (lambda: inferencer.predict(b"not an image"), "cannot be decoded"),
        (lambda: inferencer.predict(3), "cannot read an image from a 'int'"),
        (lambda: inferencer.predict_batch("a.png"), "use predict()"),
    ]
    for call, expected in cases:
        with pytest.raises(InputError) as error:
            call()
        assert expected in _one_line(error)
        assert isinstance(error.value, DeployError)


def test_a_corrupt_image_inside_a_folder_raises_when_reached(onnx_export, tmp_path, helpers):
    Image.fromarray(helpers.make_image(0.3, (16, 16))).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"broken")
    stream = load_inferencer(onnx_export).predict_source(tmp_path, batch_size=1)
    assert Path(next(stream).source).name == "a.png"
    with pytest.raises(InputError, match=r"b\.png"):
        next(stream)


def test_the_base_class_is_abstract(onnx_export):
    with pytest.raises(TypeError):
        Inferencer(onnx_export)  # type: ignore[abstract]
