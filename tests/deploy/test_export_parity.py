"""Exports in every format predict what the torch model predicts, at any batch and image size.

PaDiM and PatchCore (efficientnet_lite0 cut after stride 8, to keep tracing short) are fitted
once on a synthetic MVTec-layout category (64 px) and exported to torch, ONNX and OpenVINO
FP32, FP16 and INT8; each artefact is compared with the model's own normalized predictions
(``model.predict_batch``) on 70 images. Tolerances, on normalized scores and maps in [0, 1]
(threshold 0.5):

- torch: 1e-5; ONNX and OpenVINO FP32: 1e-4 on scores, 1e-3 on maps (other kernels, and
  memory-bank distances that lose digits to cancellation);
- OpenVINO FP16 (weights, memory bank included, in half precision; computed in float32):
  0.05, mean map difference 0.005, labels agree on at least 98 % of the images;
- OpenVINO INT8: mean score difference 0.03, mean map difference 0.02, labels agree on at
  least 98 % of the images and masks on at least 97 % of the pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly import Engine
from anomaly.io import image_to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _export_fixtures as fx  # found through the sys.path entry just above

MODELS = ("padim", "patchcore")
# Largest differences of normalized scores and of maps: other kernels sum in another order, and
# memory-bank distances lose a few digits to cancellation (||q||^2 - 2 q.m + ||m||^2).
EXACT = {"torch": (1e-5, 1e-5), "onnx": (1e-4, 1e-3), "openvino-fp32": (1e-4, 1e-3)}
FORMATS = (*EXACT, "openvino-fp16", "openvino-int8")
# Each export takes seconds of tracing. PatchCore runs in every format; PaDiM, whose graph
# differs only in the model part, in ONNX and INT8 (its hardest case), and in torch and
# OpenVINO FP32 with the slow tests; FP16 matters for PatchCore's memory bank only.
_SLOW = {("padim", "torch"), ("padim", "openvino-fp32")}


def _cases(formats: tuple[str, ...]) -> list[object]:
    return [
        pytest.param(name, fmt, marks=[pytest.mark.slow] if (name, fmt) in _SLOW else [])
        for name in MODELS
        for fmt in formats
        if not (name == "padim" and fmt == "openvino-fp16")
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_data(tmp_path_factory.mktemp("export_data"))


@pytest.fixture(scope="module")
def images(data_root: Path) -> tuple[torch.Tensor, np.ndarray]:
    return fx.all_images(data_root)


@pytest.fixture(scope="module")
def models(data_root: Path) -> dict[str, Any]:
    data = fx.datamodule(data_root)
    return {name: fx.fit(name, data, **fx.SHALLOW[name]) for name in MODELS}


@pytest.fixture(scope="module")
def exports(
    models: dict[str, Any], data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """Export lazily: each (model, format) once per module."""
    folder = tmp_path_factory.mktemp("exports")

    class Lazy(dict[tuple[str, str], Path]):
        def __missing__(self, key: tuple[str, str]) -> Path:
            name, fmt = key
            target = folder / name / fmt
            engine = Engine()
            if fmt.startswith("openvino"):
                precision = fmt.split("-")[1]
                engine.export(
                    models[name],
                    target,
                    format="openvino",
                    precision=precision,
                    # INT8 calibrates on the datamodule's training images.
                    datamodule=fx.datamodule(data_root),
                )
            else:
                engine.export(models[name], target, format=fmt)
            self[key] = target
            return target

    return Lazy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.parametrize(("name", "fmt"), _cases(FORMATS))
def test_export_matches_the_model(name, fmt, models, exports, images):
    model = models[name]
    pictures, defective = images
    expected = fx.reference(model, pictures)
    runner = fx.Runner(exports[name, fmt])
    got = runner(pictures)
    assert [array.shape for array in got] == [array.shape for array in expected]
    assert got[1].dtype == got[3].dtype == np.bool_
    score, label, anomaly_map, mask = got
    assert score.min() >= 0.0
    assert score.max() <= 1.0
    assert anomaly_map.min() >= 0.0
    assert anomaly_map.max() <= 1.0
    np.testing.assert_array_equal(label, score >= 0.5)
    np.testing.assert_array_equal(mask, anomaly_map >= 0.5)
    # The model tells defects apart, so the comparison is not about trivial constants.
    assert expected[1][defective].mean() > 0.8
    assert expected[1][~defective].mean() < 0.2
    if fmt in EXACT:
        score_tolerance, map_tolerance = EXACT[fmt]
        assert _max_diff(score, expected[0]) <= score_tolerance
        assert _max_diff(anomaly_map, expected[2]) <= map_tolerance
        # Labels can only flip for scores within rounding of the threshold.
        near = np.abs(expected[0] - 0.5) <= score_tolerance
        assert np.array_equal(label[~near], expected[1][~near])
    elif fmt == "openvino-fp16":
        assert _max_diff(score, expected[0]) <= 0.05
        assert _max_diff(anomaly_map, expected[2]) <= 0.05
        assert np.abs(anomaly_map - expected[2]).mean() <= 0.005
        assert (label == expected[1]).mean() >= 0.98
    else:
        assert np.abs(score - expected[0]).mean() <= 0.03
        assert np.abs(anomaly_map - expected[2]).mean() <= 0.02
        assert (label == expected[1]).mean() >= 0.98
        assert (mask == expected[3]).mean() >= 0.97


@pytest.mark.parametrize(("name", "fmt"), _cases((*EXACT, "openvino-int8")))
def test_one_artefact_takes_any_batch_and_image_size(name, fmt, models, exports, images):
    model = models[name]
    runner = fx.Runner(exports[name, fmt])
    pictures = images[0]
    # Batch 1 and batch 5 through the same artefact give the rows of the full batch.
    whole = runner(pictures[:5])
    single = runner(pictures[:1])
    for part, full in zip(single, whole, strict=True):
        assert part.shape[0] == 1
        assert np.allclose(part, full[:1], atol=1e-5)
    for height, width in ((61, 97), (300, 200)):
        odd = F.interpolate(pictures[:3], size=(height, width), mode="bilinear", antialias=True)
        score, label, anomaly_map, mask = runner(odd)
        assert score.shape == label.shape == (3,)
        assert anomaly_map.shape == mask.shape == (3, height, width)
        if fmt not in EXACT:
            continue
        # The graph resizes to 64 px inside, runs the model and resizes the map back.
        resized = F.interpolate(odd, size=(fx.SIZE, fx.SIZE), mode="bilinear", antialias=True)
        expected = fx.reference(model, resized)
        expected_map = F.interpolate(
            torch.from_numpy(expected[2]).unsqueeze(1),
            size=(height, width),
            mode="bilinear",
            antialias=True,
        ).squeeze(1)
        score_tolerance, map_tolerance = EXACT[fmt]
        assert _max_diff(score, expected[0]) <= score_tolerance
        assert _max_diff(anomaly_map, expected_map.numpy()) <= map_tolerance


@pytest.mark.parametrize("fmt", ["torch", "onnx", "openvino-fp32"])
def test_the_in_graph_resize_matches_training_resize(fmt, models, exports, images):
    """Raw-size images scored by an export agree with the model on Pillow-resized ones.

    Training and ``Engine.predict`` resize with Pillow, which rounds to 8 bits after each
    of its two passes; the graph resizes in float32 with the same antialiased bilinear
    filter, so model inputs differ by at most one grey level.
    """
    model = models["patchcore"]
    runner = fx.Runner(exports["patchcore", fmt])
    big = F.interpolate(images[0][:6], size=(200, 300), mode="bilinear", antialias=True)
    raw = (big.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
    as_read = torch.from_numpy(raw.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    pil = torch.stack([image_to_tensor(item, (fx.SIZE, fx.SIZE)) for item in raw])
    in_graph = F.interpolate(as_read, size=(fx.SIZE, fx.SIZE), mode="bilinear", antialias=True)
    assert float((pil - in_graph).abs().max()) <= 1 / 255 + 1e-4
    score = runner(as_read)[0]
    expected = fx.reference(model, pil)[0]
    assert _max_diff(score, expected) <= 0.02


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_follows_the_contract(fmt, models, exports):
    metadata = fx.Runner(exports["patchcore", fmt]).metadata
    expected_format = fmt.split("-")[0]
    precision = fmt.split("-")[1] if "-" in fmt else "fp32"
    files = {"torch": "model.pt2", "onnx": "model.onnx", "openvino": "model.xml"}
    assert metadata["format"] == expected_format
    assert metadata["model"] == "patchcore"
    assert metadata["model_file"] == files[expected_format]
    assert metadata["precision"] == precision
    assert metadata["input"]["height"] == metadata["input"]["width"] == fx.SIZE
    assert metadata["inputs"] == {"image": "float32 N x 3 x H x W RGB in [0, 1], any N, H, W"}
    assert metadata["outputs"] == list(fx.OUTPUTS)
    post = models["patchcore"].post_processor
    assert metadata["post_processing"]["image_threshold"] == pytest.approx(
        float(post.image_threshold)
    )
    assert metadata["post_processing"]["pixel_max"] == pytest.approx(float(post.pixel_max))
    versions = metadata["versions"]
    assert {"anomaly_core", "anomaly_deploy", "torch"} <= set(versions)
    tools = {"onnx": {"onnx", "onnxruntime"}, "openvino": {"openvino", "onnx"}}
    assert tools.get(expected_format, set()) <= set(versions)
    if precision == "int8":
        assert "nncf" in versions
    folder = exports["patchcore", fmt]
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        ["metadata.json", files[expected_format]]
        + (["model.bin"] if expected_format == "openvino" else [])
    )


def test_fp16_weights_take_half_the_space(exports):
    fp32 = (exports["patchcore", "openvino-fp32"] / "model.bin").stat().st_size
    fp16 = (exports["patchcore", "openvino-fp16"] / "model.bin").stat().st_size
    assert fp16 < 0.6 * fp32


def test_the_torch_export_runs_without_anomaly(exports, tmp_path):
    """A .pt2 file needs torch alone: the anomaly packages may be absent where it runs."""
    import subprocess

    program = str(exports["patchcore", "torch"] / "model.pt2")
    script = (
        "import sys\n"
        "for name in ('anomaly', 'anomaly_models_memory', 'anomaly_deploy', 'lightning', 'timm'):\n"
        "    sys.modules[name] = None\n"
        "import torch\n"
        f"module = torch.export.load({program!r}).module()\n"
        "score, label, amap, mask = module(torch.rand(2, 3, 50, 70))\n"
        "assert amap.shape == (2, 50, 70) and label.dtype == torch.bool\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert not list(tmp_path.iterdir())  # no cache folders in the working directory
