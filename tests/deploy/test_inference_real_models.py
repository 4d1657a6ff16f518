"""Real models, fitted and exported by the CLI, predict alike with and without torch.

``anomaly predict --ckpt`` (the Lightning model) and ``anomaly predict --model`` on its ONNX
and OpenVINO exports must return the same scores and labels for the same images.

Marked ``slow``: fitting real backbones and tracing them for export takes tens of seconds on
two CPU cores, past the budget of the fast suite (``-m "not slow"`` leaves it out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomaly._cli import main

pytest.importorskip(
    "anomaly_deploy.export", reason="the exporters (anomaly_deploy.export) are not installed"
)

CASES = [("patchcore", "onnx"), ("patchcore", "openvino"), ("padim", "onnx")]


def _json(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fit each model once on a small synthetic MVTec-layout set; map its name to its checkpoint."""
    from anomaly.testing import make_synthetic_mvtec

    root = tmp_path_factory.mktemp("mvtec")
    make_synthetic_mvtec(root, n_train=8, n_good_test=4, n_defect_test=4)
    found: dict[str, Path] = {}
    for name in sorted({model for model, _ in CASES}):
        results = tmp_path_factory.mktemp(f"results_{name}")
        args = ["fit", "--model", name, "--data", "mvtec_ad", "--data.root", str(root)]
        args += ["--data.category", "widget", "--data.image_size", "64"]
        assert main([*args, "--results_dir", str(results), "--json"]) == 0
        found[name] = next(results.rglob("model.ckpt"))
    return found


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dark and bright textures, at the model's 64 x 64 and at other sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("sample_images")
    for index, (brightness, size) in enumerate(
        [(0.3, (64, 64)), (0.9, (64, 64)), (0.3, (48, 80)), (0.9, (96, 72))]
    ):
        values = brightness + 0.05 * rng.standard_normal((*size, 3))
        array = np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{index}.png")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("model", "fmt"), CASES)
def test_exports_predict_like_the_checkpoint(
    model, fmt, checkpoints, sample_images, tmp_path, capsys
):
    capsys.readouterr()
    checkpoint = checkpoints[model]
    args = ["predict", "--ckpt", str(checkpoint), "-o", str(tmp_path / "p"), str(sample_images)]
    reference = _json(capsys, [*args, "--visualizer", "none"])["predictions"]

    export = tmp_path / "export"
    code = main(["export", "--ckpt", str(checkpoint), "--format", fmt, "-o", str(export)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metadata = json.loads((export / "metadata.json").read_text())
    assert metadata["format"] == fmt
    assert metadata["outputs"] == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]
    args = ["predict", "--model", str(export), "-o", str(tmp_path / fmt), str(sample_images)]
    predicted = _json(capsys, args)["predictions"]
    assert [row["image_path"] for row in predicted] == [row["image_path"] for row in reference]
    for ours, theirs in zip(predicted, reference, strict=True):
        # One batch of mixed sizes: resized on the host with Pillow to 64 x 64, the pixels
        # the checkpoint path feeds its model; only float rounding differs.
        assert ours["pred_score"] == pytest.approx(theirs["pred_score"], abs=1e-3)
        assert ours["pred_label"] == theirs["pred_label"]

    from anomaly_deploy.inference import load_inferencer

    inferencer = load_inferencer(export)
    singles = [inferencer.predict(path) for path in sorted(sample_images.glob("*.png"))]
    for prediction, row in zip(singles, reference, strict=True):
        # Alone, each image is resized by the graph at its own size (torch's antialiased
        # bilinear): close to Pillow's resize, not identical.
        assert prediction.pred_score == pytest.approx(row["pred_score"], abs=0.05)
        assert prediction.anomaly_map.shape == prediction.image.shape[:2]
        assert np.isfinite(prediction.anomaly_map).all()
        np.testing.assert_array_equal(prediction.pred_mask, prediction.anomaly_map >= 0.5)
