"""ImageVisualizer figures and the safe output names of every Visualizer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly import Batch, ConfigError, DataError, PluginManager, builtin
from anomaly.visualizers import ImageVisualizer, Visualizer, jet_colormap

RED = np.array([255, 0, 0], dtype=np.uint8)


def square_mask(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def fake_batch(size: int = 64) -> Batch:
    """Two images with a smooth gradient; the first has a bright defect that is predicted."""
    ramp = np.linspace(0.2, 0.6, size, dtype=np.float32)
    image = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), 0.3)]
    )
    images = np.stack([image, image]).astype(np.float32)
    truth = np.stack([square_mask(size, 20, 24, 12), np.zeros((size, size), bool)])
    images[0][:, truth[0]] = 0.9
    predicted = np.stack([square_mask(size, 18, 22, 14), np.zeros((size, size), bool)])
    anomaly_map = np.where(truth, 0.95, 0.1).astype(np.float32)
    return Batch(
        image=torch.from_numpy(images),
        gt_label=torch.tensor([1, 0]),
        gt_mask=torch.from_numpy(truth),
        image_path=("/data/bottle/test/crack/000.png", "/data/bottle/test/good/000.png"),
        pred_score=torch.tensor([0.83, 0.12]),
        anomaly_map=torch.from_numpy(anomaly_map),
        pred_label=torch.tensor([1, 0]),
        pred_mask=torch.from_numpy(predicted),
        raw_score=torch.tensor([4.1, 0.7]),
        raw_map=torch.from_numpy(anomaly_map * 5),
    )


def panel(figure: np.ndarray, visualizer: ImageVisualizer, column: int, size: int) -> np.ndarray:
    layout = visualizer.layout(size, size)
    x, y = layout.origins[column]
    width, height = layout.panel_size
    return figure[y : y + height, x : x + width]


def enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.round(image.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


def test_writes_one_png_per_image_with_four_panels(tmp_path: Path):
    visualizer = ImageVisualizer(tmp_path / "images")
    paths = visualizer.visualize(fake_batch())
    assert paths == [tmp_path / "images/crack/000.png", tmp_path / "images/good/000.png"]
    layout = visualizer.layout(64, 64)
    # 64-pixel images are enlarged twice to reach the 128-pixel minimum panel size.
    assert (layout.scale, layout.panel_size) == (2, (128, 128))
    for path in paths:
        with Image.open(path) as figure:
            assert figure.format == "PNG"
            assert figure.mode == "RGB"
            assert figure.size == layout.size
    width, height = layout.size
    assert 4 * 128 < width < 4 * 128 + 40
    assert 128 < height < 128 + 80
    # Panels do not overlap and run left to right.
    xs = [x for x, _ in layout.origins]
    assert all(later - earlier >= 128 for earlier, later in itertools.pairwise(xs))


def test_first_panel_is_the_input_image(tmp_path: Path):
    batch = fake_batch()
    visualizer = ImageVisualizer(tmp_path)
    figure = np.asarray(Image.open(visualizer.visualize(batch)[0]))
    assert np.array_equal(panel(figure, visualizer, 0, 64), enlarge(to_uint8(batch.image[0]), 2))


def test_heat_map_panel_blends_the_colormap(tmp_path: Path):
    batch = fake_batch()
    visualizer = ImageVisualizer(tmp_path, alpha=0.5)
    figure = np.asarray(Image.open(visualizer.visualize(batch)[0]), dtype=np.float64)
    heat = panel(figure, visualizer, 1, 64)
    image = enlarge(to_uint8(batch.image[0]), 2).astype(np.float64)
    # The post-processed map (0.95 on the defect, 0.1 elsewhere) is shown, not the raw one.
    assert batch.anomaly_map is not None
    colours = enlarge(jet_colormap(batch.anomaly_map[0].numpy()), 2).astype(np.float64)
    expected = 0.5 * image + 0.5 * colours
    assert np.abs(heat - expected).max() <= 1
    # Hot defect, cold background.
    assert heat[60, 60, 0] > heat[60, 60, 2]
    assert heat[5, 5, 2] > heat[5, 5, 0]


def test_prediction_panel_outlines_the_predicted_mask_in_red(tmp_path: Path):
    batch = fake_batch()
    visualizer = ImageVisualizer(tmp_path)
    figure = np.asarray(Image.open(visualizer.visualize(batch)[0]))
    outlined = panel(figure, visualizer, 2, 64)
    assert batch.pred_mask is not None
    mask = enlarge(batch.pred_mask[0].numpy(), 2)
    padded = np.pad(mask, 1)
    # A mask pixel is on the boundary when one of its 8 neighbours (or the frame) is outside.
    interior = np.ones_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            interior &= padded[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]
    boundary = mask & ~interior
    assert boundary.sum() == 4 * (28 - 1)  # a 28 x 28 square after enlarging
    assert (outlined[boundary] == RED).all()
    image = enlarge(to_uint8(batch.image[0]), 2)
    assert np.array_equal(outlined[~boundary], image[~boundary])


def test_outline_follows_the_image_frame(tmp_path: Path):
    batch = fake_batch()
    batch = batch.replace(pred_mask=torch.ones(2, 64, 64, dtype=torch.bool))
    visualizer = ImageVisualizer(tmp_path)
    figure = np.asarray(Image.open(visualizer.visualize(batch)[1]))
    outlined = panel(figure, visualizer, 2, 64)
    assert (outlined[0] == RED).all()
    assert (outlined[:, -1] == RED).all()
    assert not (outlined[1:-1, 1:-1] == RED).all(axis=-1).any()


def test_ground_truth_panel_is_white_on_black_or_grey_without_masks(tmp_path: Path):
    batch = fake_batch()
    visualizer = ImageVisualizer(tmp_path)
    figure = np.asarray(Image.open(visualizer.visualize(batch)[0]))
    truth = panel(figure, visualizer, 3, 64)
    assert batch.gt_mask is not None
    expected = enlarge(batch.gt_mask[0].numpy(), 2)
    assert (truth[expected] == 255).all()
    assert (truth[~expected] == 0).all()

    no_masks = ImageVisualizer(tmp_path / "no_masks")
    figure = np.asarray(Image.open(no_masks.visualize(batch.replace(gt_mask=None))[0]))
    grey = panel(figure, no_masks, 3, 64)
    # Grey everywhere but the centred "no mask" text.
    assert (grey[:40] == 128).all()
    assert (grey[-40:] == 128).all()
    assert (grey != 128).any()


def test_large_images_keep_their_size_and_maps_are_resized(tmp_path: Path):
    image = torch.rand(1, 3, 150, 200)
    batch = Batch(
        image=image,
        image_path=("x/y.png",),
        anomaly_map=torch.rand(1, 75, 100),
        pred_mask=torch.rand(1, 75, 100) > 0.5,
        gt_mask=torch.zeros(1, 150, 200, dtype=torch.bool),
    )
    visualizer = ImageVisualizer(tmp_path)
    (path,) = visualizer.visualize(batch)
    layout = visualizer.layout(150, 200)
    assert (layout.scale, layout.panel_size) == (1, (200, 150))
    with Image.open(path) as figure:
        assert figure.size == layout.size


def test_a_raw_map_outside_the_unit_range_is_scaled_per_image(tmp_path: Path):
    batch = fake_batch()
    visualizer = ImageVisualizer(tmp_path, alpha=1.0)
    figure = np.asarray(
        Image.open(visualizer.visualize(batch.replace(anomaly_map=batch.raw_map))[0])
    )
    heat = panel(figure, visualizer, 1, 64)
    # alpha 1 shows the colormap alone: the top of the range is jet's dark red.
    assert np.array_equal(heat[60, 60], jet_colormap(np.array([1.0]))[0])
    assert np.array_equal(heat[5, 5], jet_colormap(np.array([0.0]))[0])


def test_jet_colormap_endpoints():
    colours = jet_colormap(np.array([0.0, 0.5, 1.0, -3.0, 7.0]))
    assert colours.tolist() == [[0, 0, 128], [128, 255, 128], [128, 0, 0], [0, 0, 128], [128, 0, 0]]


@pytest.mark.parametrize(
    ("image_path", "expected"),
    [
        ("../../etc/x.png", "etc/x.png"),
        ("/abs/../../x.png", "x.png"),
        ("..\\..\\windows\\evil.bmp", "windows/evil.png"),
        ("../../../", "image_000000.png"),
        ("", "image_000000.png"),
        ("data/..hidden/.x.png", "hidden/x.png"),
        ("data/we ird:na*me/a b?.png", "we_ird_na_me/a_b_.png"),
        ("données/défaut/01.png", "défaut/01.png"),
    ],
)
def test_output_names_stay_inside_the_output_folder(tmp_path: Path, image_path: str, expected: str):
    visualizer = ImageVisualizer(tmp_path / "out")
    path = visualizer.output_path(image_path)
    assert path == tmp_path / "out" / expected
    assert path.resolve().is_relative_to((tmp_path / "out").resolve())


def test_shared_names_are_deduplicated(tmp_path: Path):
    batch = fake_batch()
    batch = batch.replace(image_path=("a/test/good/000.png", "b/test/GOOD/000.png"))
    visualizer = ImageVisualizer(tmp_path)
    first = visualizer.visualize(batch)
    second = visualizer.visualize(batch.replace(image_path=("", "")))
    assert [path.relative_to(tmp_path).as_posix() for path in first + second] == [
        "good/000.png",
        "GOOD/000_1.png",
        "image_000000.png",
        "image_000001.png",
    ]
    assert all(path.is_file() for path in first + second)


def test_missing_predictions_render_placeholder_panels(tmp_path: Path):
    batch = Batch(image=torch.rand(1, 3, 32, 32), image_path=("a/b.png",))
    (path,) = ImageVisualizer(tmp_path).visualize(batch)
    with Image.open(path) as figure:
        pixels = np.asarray(figure)
    visualizer = ImageVisualizer(tmp_path)
    for column in (1, 2, 3):
        assert (panel(pixels, visualizer, column, 32)[:10] == 128).all()


def test_bad_image_shape_is_a_data_error(tmp_path: Path):
    batch = Batch(image=torch.rand(1, 4, 8, 8))
    with pytest.raises(DataError, match=r"\(4, 8, 8\)"):
        ImageVisualizer(tmp_path).visualize(batch)


@pytest.mark.parametrize(
    "options", [{"alpha": 1.5}, {"alpha": "0.5"}, {"min_panel_size": 0}, {"min_panel_size": 2.5}]
)
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, object]):
    with pytest.raises(ConfigError, match="visualizer"):
        ImageVisualizer(tmp_path, **options)  # type: ignore[arg-type]


def test_registered_visualizer_loads_and_builds(tmp_path: Path):
    manager = PluginManager(discover=False)
    manager.register(builtin, "core", distribution="anomaly-core")
    target = manager.visualizer("image").load()
    assert isinstance(target, type)
    assert issubclass(target, Visualizer)
    visualizer = target(tmp_path)
    assert visualizer.visualize(fake_batch())[0].is_file()
