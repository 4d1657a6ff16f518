"""Exporters fail early and cleanly: one-line errors, nothing half-written, the culprit named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly import AnomalyModule, ConfigError, DataError, Engine, ExportError
from anomaly_deploy.export import (
    calibration_images,
    export_onnx,
    export_openvino,
    export_torch,
)
from anomaly_deploy.export._calibration import with_synthetic_defects
from anomaly_deploy.export._graph import InferenceGraph, resize_bilinear_antialias

EXPORTERS = {"torch": export_torch, "onnx": export_onnx, "openvino": export_openvino}


class Brightness(AnomalyModule):
    """A tiny fitted model: the score is the brightest pixel, the map the channel mean."""

    def __init__(self, loop_over_batch: bool = False) -> None:
        super().__init__()
        self.loop_over_batch = loop_over_batch
        self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)
        self.input_size = (16, 16)
        post = self.post_processor
        for name, value in {
            "image_threshold": 0.5,
            "image_min": 0.0,
            "image_max": 1.0,
            "pixel_threshold": 0.5,
            "pixel_min": 0.0,
            "pixel_max": 1.0,
        }.items():
            getattr(post, name).fill_(value)
        post.fitted.fill_(True)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = image.mean(dim=1) * self.scale
        if self.loop_over_batch:
            # Python control flow on the batch size: what torch.export cannot keep dynamic.
            rows = [anomaly_map[index].amax() for index in range(int(image.shape[0]))]
            return torch.stack(rows), anomaly_map
        return anomaly_map.flatten(1).amax(dim=1), anomaly_map


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_an_unfitted_model_is_refused_before_any_work(fmt, tmp_path):
    model = Brightness()
    model.post_processor.fitted.fill_(False)
    with pytest.raises(ExportError, match="not fitted"):
        EXPORTERS[fmt](model, tmp_path / "out")
    model = Brightness()
    model.input_size = None
    with pytest.raises(ExportError, match="input size"):
        EXPORTERS[fmt](model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_engine_refuses_unfitted_models_too(tmp_path):
    model = Brightness()
    model.post_processor.fitted.fill_(False)
    with pytest.raises(ConfigError, match="fit it first"):
        Engine().export(model, tmp_path / "out", format="onnx")


@pytest.mark.parametrize(
    ("fmt", "options", "error", "match"),
    [
        ("torch", {"opset": 17}, ExportError, r"does not take option\(s\) \['opset'\]"),
        ("onnx", {"calibration": "x"}, ExportError, "accepts \\['precision'\\]"),
        ("openvino", {"bits": 4}, ExportError, "calibration_size"),
        ("torch", {"precision": "fp16"}, ConfigError, "use --format openvino"),
        ("onnx", {"precision": "int8"}, ConfigError, "writes precision \\['fp32'\\] only"),
        ("openvino", {"precision": "fp8"}, ConfigError, "unknown precision 'fp8'"),
        ("openvino", {"precision": "int8"}, ConfigError, "needs calibration images"),
        ("openvino", {"calibration_size": 0}, ConfigError, "calibration_size"),
        ("openvino", {"quantize_share": 1.5}, ConfigError, "quantize_share"),
    ],
)
def test_bad_options_fail_in_one_line_before_any_work(fmt, options, error, match, tmp_path):
    with pytest.raises(error, match=match) as caught:
        EXPORTERS[fmt](Brightness(), tmp_path / "out", **options)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_empty_is_left_alone(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_torch(Brightness(), target)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]


def test_code_that_fixes_the_batch_size_is_named(tmp_path):
    target = tmp_path / "deep" / "out"
    with pytest.raises(ExportError) as caught:
        export_torch(Brightness(loop_over_batch=True), target)
    message = str(caught.value)
    assert "\n" not in message
    assert "batch size" in message
    assert "forward" in message
    assert "test_export_errors.py" in message
    assert "range(int(image.shape[0]))" in message  # the offending line itself
    assert not (tmp_path / "deep").exists()  # nothing half-written, no folders left behind


def test_a_tiny_model_exports_to_every_format_and_leaves_the_cwd_clean(tmp_path, monkeypatch):
    """End to end on a model with no backbone: quick, and shows the graph is generic."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    image = torch.rand(2, 3, 40, 30)
    expected = [output.numpy() for output in InferenceGraph(Brightness())(image)]
    for fmt, export in EXPORTERS.items():
        folder = export(Brightness(), tmp_path / fmt)
        assert (folder / "metadata.json").is_file()
    import onnxruntime as ort
    import openvino as ov

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), options)
    got = session.run(None, {"image": image.numpy()})
    # float32 arithmetic: CPUs with bf16 units (this one, maybe) default to bf16.
    compiled = ov.Core().compile_model(
        str(tmp_path / "openvino" / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    results = compiled([image.numpy()])
    for runtime in (got, [results[port] for port in compiled.outputs]):
        for out, want in zip(runtime, expected, strict=True):
            assert np.allclose(out, want, atol=1e-5)
    assert list(work.iterdir()) == []  # no caches or reports in the working directory


def test_the_portable_resize_equals_torchs_antialiased_resize():
    generator = torch.Generator().manual_seed(0)
    cases = [((2, 3, 300, 200), (64, 64)), ((1, 1, 61, 97), (256, 256)), ((1, 3, 5, 3), (7, 9))]
    for shape, size in cases:
        image = torch.rand(*shape, generator=generator)
        expected = torch.nn.functional.interpolate(
            image, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        for gather in (True, False):
            resized = resize_bilinear_antialias(image, size, gather=gather)
            assert torch.allclose(resized, expected, atol=1e-6)


def test_calibration_images_come_from_folders_loaders_and_tensors(tmp_path):
    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    for index in range(5):
        array = np.full((20, 30, 3), index * 40, dtype=np.uint8)
        Image.fromarray(array).save(folder / ("sub" if index % 2 else ".") / f"{index}.png")
    (folder / ".hidden.png").write_bytes(b"not an image")
    from_folder = calibration_images(folder, (8, 8), limit=3)
    assert len(from_folder) == 3
    assert all(image.shape == (1, 3, 8, 8) for image in from_folder)
    batches = [torch.rand(4, 3, 8, 8), {"image": torch.rand(2, 3, 8, 8)}]
    assert len(calibration_images(batches, (8, 8), limit=5)) == 5
    with_defects = with_synthetic_defects(from_folder)
    assert len(with_defects) == 6
    assert not np.array_equal(with_defects[3], with_defects[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        calibration_images(tmp_path / "empty", (8, 8), 3)
    with pytest.raises(DataError, match="does not exist"):
        calibration_images(tmp_path / "missing", (8, 8), 3)
    with pytest.raises(ConfigError, match="not a float image"):
        calibration_images(["text"], (8, 8), 3)


def test_int8_without_images_in_the_calibration_folder_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        export_openvino(Brightness(), tmp_path / "out", precision="int8", calibration=empty)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]
