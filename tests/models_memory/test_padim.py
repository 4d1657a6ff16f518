"""PaDiM: running Gaussian statistics, Mahalanobis maps, checkpoints, config."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from anomaly import ConfigError, DataError, get_plugin_manager
from anomaly._batch import collate
from anomaly_models_memory import NotFittedError, Padim, PadimNet
from anomaly_models_memory.padim.torch_model import GaussianAccumulator


def fitted(textures: dict[str, torch.Tensor], **options: object) -> Padim:
    model = Padim(**options)  # type: ignore[arg-type]
    for images in textures["train"].split(5):
        model.collect(images)
    model.fit_end()
    return model.eval()


@pytest.fixture(scope="module")
def model(textures: dict[str, torch.Tensor]) -> Padim:
    return fitted(textures)


@pytest.mark.parametrize("flush_every", [1, 10, 256])
def test_accumulated_statistics_equal_the_sample_covariance(flush_every: int) -> None:
    generator = torch.Generator().manual_seed(0)
    data = 100.0 + torch.randn(50, 3, 4, generator=generator) @ torch.randn(
        4, 4, generator=generator
    )
    accumulator = GaussianAccumulator(positions=3, features=4, flush_every=flush_every)
    for part in data.split(7):  # batches of unequal size
        accumulator.update(part)
    mean, inverse = accumulator.compute(epsilon=0.01)
    for position in range(3):
        samples = data[:, position].double()
        torch.testing.assert_close(mean[position].double(), samples.mean(dim=0))
        covariance = torch.cov(samples.T) + 0.01 * torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(
            inverse[position].double(), torch.linalg.inv(covariance), rtol=1e-4, atol=1e-4
        )


def test_shapes_and_determinism(model: Padim, textures: dict[str, torch.Tensor]) -> None:
    images = torch.cat([textures["normal"], textures["defective"]])
    with torch.no_grad():
        score, anomaly_map = model(images)
        again, _ = model(images)
    assert score.shape == (8,)
    assert anomaly_map.shape == (8, 64, 64)
    assert torch.equal(score, again)
    torch.testing.assert_close(score, anomaly_map.flatten(1).max(dim=1).values)
    assert model.model.mean.shape == (100, 16, 16)  # stride 4 on 64 px
    assert model.model.inv_covariance.shape == (256, 100, 100)
    assert torch.equal(fitted(textures).model.inv_covariance, model.model.inv_covariance)


def test_defects_score_higher_and_maps_peak_on_them(
    model: Padim,
    textures: dict[str, torch.Tensor],
    assert_peaks_on_blobs: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    with torch.no_grad():
        normal_score, _ = model(textures["normal"])
        defect_score, defect_map = model(textures["defective"])
    assert float(defect_score.min()) > float(normal_score.max())
    assert_peaks_on_blobs(defect_map, textures["centers"])


def test_state_dict_round_trip_keeps_channels_and_statistics(
    model: Padim, textures: dict[str, torch.Tensor]
) -> None:
    fresh = Padim(seed=1)  # another channel choice, empty statistics
    assert not torch.equal(fresh.model.channel_index, model.model.channel_index)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        expected = model(textures["defective"])
        got = fresh(textures["defective"])
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_openvino_backbone_gives_eager_scores(
    model: Padim, textures: dict[str, torch.Tensor]
) -> None:
    fast = fitted(textures, backbone_runtime="openvino")
    assert fast.model.feature_extractor.runtime == "openvino"
    assert fast.hparams["backbone_runtime"] == "openvino"
    assert list(fast.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(fast.model.mean, model.model.mean, rtol=1e-4, atol=1e-4)
    images = torch.cat([textures["normal"], textures["defective"]])
    with torch.inference_mode():  # as in Lightning's test loop
        expected_score, expected_map = model(images)
        score, anomaly_map = fast(images)
    scale = float(expected_map.abs().max())
    torch.testing.assert_close(score, expected_score, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(anomaly_map, expected_map, rtol=1e-4, atol=1e-4 * scale)


def test_other_image_sizes_are_refused(model: Padim) -> None:
    with pytest.raises(DataError, match=r"fitted on \(16, 16\).*resize"):
        model(torch.rand(1, 3, 96, 64))


def test_unfitted_model_refuses_to_score() -> None:
    with pytest.raises(NotFittedError, match="Gaussian statistics are empty"):
        Padim()(torch.rand(1, 3, 64, 64))


def test_all_channels_are_kept_on_request() -> None:
    net = PadimNet(n_features=None, strides=(8, 16))
    assert net.n_features == 40 + 112
    assert net.embed(torch.rand(1, 3, 64, 64)).shape == (1, 152, 8, 8)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_features": 0}, "n_features"),
        ({"n_features": 500}, r"n_features 500 must lie in \[1, 176\]"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"sigma": -1.0}, "sigma"),
        ({"strides": [3]}, "available strides"),
        ({"strides": [4, 4]}, "repeat"),
        ({"backbone_runtime": "openvno"}, "did you mean 'openvino'"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Padim(**options)  # type: ignore[arg-type]


def test_mixed_training_sizes_are_refused() -> None:
    padim = Padim()
    padim.collect(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="one size"):
        padim.collect(torch.rand(1, 3, 32, 32))


def test_registered_and_fits_through_lightning(textures: dict[str, torch.Tensor]) -> None:
    spec = get_plugin_manager().model("padim")
    assert spec.family == "memory"
    assert spec.load() is Padim
    items = [{"image": image, "gt_label": 0} for image in textures["train"]]
    loader: DataLoader[dict[str, object]] = DataLoader(
        items,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=4,
        collate_fn=collate,
    )
    model = Padim()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=loader)
    assert model.model.inv_covariance.shape == (256, 100, 100)
    assert model.hparams["n_features"] == 100


def test_recentered_sums_merge_like_one_pass() -> None:
    generator = torch.Generator().manual_seed(5)
    data = 50.0 + torch.randn(30, 2, 3, generator=generator)
    whole = GaussianAccumulator(2, 3)
    whole.update(data)
    first, second = GaussianAccumulator(2, 3), GaussianAccumulator(2, 3)
    first.update(data[:10])
    second.update(data[10:] + 0.0)
    assert first.shift is not None
    second.recenter(first.shift)  # what all_reduce does before summing across processes
    first.sum += second.sum
    first.outer += second.outer
    first.count += second.count
    for got, want in zip(first.compute(0.01), whole.compute(0.01), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
