"""Torch-free pictures of predictions and the predictions.csv / .json / PNG writer."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from anomaly_deploy.inference import Prediction, PredictionWriter, colorize, overlay, render
from anomaly_deploy.inference._visualize import JET, outline


def _prediction(score: float, size: tuple[int, int] = (40, 60), source: str = "a/b.png"):
    height, width = size
    anomaly_map = np.zeros(size, dtype=np.float32)
    anomaly_map[10:30, 20:40] = 0.9
    return Prediction(
        pred_score=score,
        pred_label=score >= 0.5,
        anomaly_map=anomaly_map,
        pred_mask=anomaly_map >= 0.5,
        image=np.full((height, width, 3), 100, dtype=np.uint8),
        source=source,
    )


def test_the_colormap_is_core_s_jet_ramp():
    from anomaly.visualizers import jet_colormap

    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float64)[None]
    np.testing.assert_array_equal(colorize(ramp)[0], jet_colormap(ramp)[0])
    assert JET.shape == (256, 3)
    assert tuple(colorize(np.array([[0.0, 1.0, np.nan, 7.0]]))[0, 0]) == (0, 0, 128)
    assert tuple(colorize(np.array([[1.0]]))[0, 0]) == (128, 0, 0)
    assert tuple(colorize(np.array([[np.nan, 7.0]]))[0, 1]) == (128, 0, 0)


def test_overlay_blends_by_alpha():
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    anomaly_map = np.ones((2, 2), dtype=np.float32)
    np.testing.assert_array_equal(overlay(image, anomaly_map, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, anomaly_map, alpha=1.0)[0, 0], (128, 0, 0))


def test_outline_is_the_mask_boundary():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    edge = outline(mask)
    assert edge.sum() == 16  # the ring of a 5 x 5 square
    assert not edge[3, 3]
    full = outline(np.ones((3, 3), dtype=bool))  # the frame counts as outside
    assert full.sum() == 8
    assert not full[1, 1]
    assert not outline(np.zeros((3, 3), dtype=bool)).any()


def test_render_draws_verdict_outline_and_heat_map():
    normal = render(_prediction(0.2))
    anomalous = render(_prediction(0.8), min_panel_size=1)
    # No enlargement with min_panel_size=1: two 60 px panels, a 4 px gap, a banner on top.
    height, width, channels = anomalous.shape
    assert (width, channels) == (2 * 60 + 4, 3)
    banner = height - 40
    assert banner > 8
    assert tuple(anomalous[1, 1]) == (190, 30, 30)  # red banner: anomalous
    assert tuple(normal[1, 1]) == (30, 130, 60)  # green banner: normal
    left = anomalous[banner:, :60]
    right = anomalous[banner:, 64:]
    assert tuple(left[10, 25]) == (255, 0, 0)  # the mask's top edge is outlined
    assert tuple(left[20, 30]) == (100, 100, 100)  # its inside is untouched
    assert right[20, 30, 0] > right[20, 30, 2]  # hot inside: red over blue
    assert right[2, 2, 2] > right[2, 2, 0]  # cold outside: blue over red
    # Small images are enlarged to at least min_panel_size per panel.
    assert normal.shape[1] == 2 * 60 * 3 + 4


def test_the_writer_writes_tables_and_one_picture_per_prediction(tmp_path):
    predictions = [
        _prediction(0.8, source="/data/good/000.png"),
        _prediction(0.2, source="/data/bad/000.png"),
        _prediction(0.3, source="/other/bad/000.png"),  # same parent and stem: renamed
        _prediction(0.6, source="frame:12"),
        _prediction(0.1, source="../../etc/passwd"),
    ]
    with PredictionWriter(tmp_path / "out") as writer:
        written = [writer.write(p) for p in predictions]
    assert written == writer.written
    names = [path.relative_to(tmp_path / "out" / "images").as_posix() for path in writer.written]
    assert names == [
        "good/000.png",
        "bad/000.png",
        "bad/000_1.png",
        "frame_12.png",
        "etc/passwd.png",
    ]
    for path, prediction in zip(writer.written, predictions, strict=True):
        assert np.asarray(Image.open(path)).shape == render(prediction).shape
    with (tmp_path / "out" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image_path", "pred_score", "pred_label"]
    assert rows[1] == ["/data/good/000.png", "0.800000", "True"]
    assert len(rows) == 6
    table = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert table[3] == {"image_path": "frame:12", "pred_score": 0.6, "pred_label": True}


def test_the_writer_without_pictures_and_on_errors(tmp_path):
    with PredictionWriter(tmp_path / "tables", images=False) as writer:
        assert writer.write(_prediction(0.7)) is None
    assert not (tmp_path / "tables" / "images").exists()
    assert (tmp_path / "tables" / "predictions.json").is_file()
    writer = PredictionWriter(tmp_path / "failed")
    writer.write(_prediction(0.7))
    writer.__exit__(RuntimeError, RuntimeError(), None)
    assert not (tmp_path / "failed" / "predictions.csv").exists()


def test_predictions_summarise_without_arrays():
    prediction = _prediction(0.75, source="x.png")
    assert prediction.to_dict() == {"source": "x.png", "pred_score": 0.75, "pred_label": True}
    assert "x.png" in repr(prediction)
    assert "40x60" in repr(prediction)
    with pytest.raises(AttributeError):
        prediction.pred_score = 0.1  # type: ignore[misc]
