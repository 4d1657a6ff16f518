"""DFM: streamed PCA against scikit-learn, scores and maps, checkpoints, export, config."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from anomaly import ConfigError, DataError, get_plugin_manager
from anomaly._batch import collate
from anomaly_models_memory import NotFittedError
from anomaly_models_memory._common import (
    PcaAccumulator,
    RunningMoments,
    pca_from_covariance,
    pca_from_rows,
)
from anomaly_models_memory.dfm import Dfm, DfmNet

# The 8 x 8 stride-8 grid of 64 px images, unpooled: 64 positions of 40 channels. (At stride
# 16 a 64 px image is 4 x 4 positions that each see most of it: too coarse to localize.)
OPTIONS: dict[str, object] = {"stride": 8, "pooling_kernel_size": 1, "sigma": 0.0}


@pytest.fixture(scope="module")
def train(textures: dict[str, torch.Tensor]) -> torch.Tensor:
    """48 normal training images: the textures and their flips (other stripe phases)."""
    images = textures["train"]
    return torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-2, -1)])


@pytest.fixture(scope="module")
def model(train: torch.Tensor) -> Dfm:
    dfm = Dfm(**OPTIONS)  # type: ignore[arg-type]
    for images in train.split(20):  # batches of unequal size
        dfm.collect(images)
    dfm.fit_end()
    return dfm.eval()


def scores(model: Dfm, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(images)  # type: ignore[no-any-return]


def correlated(rows: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(rows, features, generator=generator, dtype=torch.float64)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    return 100.0 + data @ mixing  # far from zero: sums must not lose precision


def test_running_moments_equal_the_sample_statistics() -> None:
    data = correlated(50, 6, seed=0)
    moments = RunningMoments(6)
    for part in data.split(7):
        moments.update(part)
    mean, covariance = moments.compute()
    torch.testing.assert_close(mean, data.mean(dim=0))
    torch.testing.assert_close(covariance, torch.cov(data.T))
    # What all_reduce does before summing: another shift, the same statistics.
    moments.recenter(torch.full((6,), -3.0, dtype=torch.float64))
    for got, want in zip(moments.compute(), (mean, covariance), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("rows", "level"), [(30, 0.9), (200, 0.97), (200, 1.0)])
def test_streamed_pca_matches_scikit_learn(rows: int, level: float) -> None:
    # The accumulator keeps rows in float32 (what features are): compare on the same numbers.
    data = correlated(rows, 40, seed=1).float().double()
    accumulator = PcaAccumulator(40)
    for part in data.split(16):
        accumulator.update(part)
    # Fewer rows than dimensions are kept as rows; more become moments.
    assert (accumulator.moments is None) == (rows < 40)
    assert accumulator.count == rows
    mean, components, variances, total = accumulator.compute(level=level)
    reference = PCA(n_components=min(level, 0.999999), svd_solver="full").fit(data.numpy())
    kept = min(rows - 1, 40) if level == 1.0 else reference.n_components_
    assert components.shape == (kept, 40)
    np.testing.assert_allclose(mean.numpy(), reference.mean_, rtol=1e-10)
    np.testing.assert_allclose(total, data.var(dim=0).sum().item(), rtol=1e-9)
    expected = PCA(n_components=kept, svd_solver="full").fit(data.numpy())
    np.testing.assert_allclose(variances.numpy(), expected.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(
        np.abs(components.numpy()), np.abs(expected.components_), rtol=1e-5, atol=1e-7
    )


def test_gram_and_covariance_pca_agree() -> None:
    data = correlated(30, 50, seed=2)
    mean, from_rows, row_variances = pca_from_rows(data, n_components=10)
    from_covariance, variances = pca_from_covariance(torch.cov(data.T), n_components=10)
    torch.testing.assert_close(mean, data.mean(dim=0))
    torch.testing.assert_close(row_variances, variances)
    torch.testing.assert_close(from_rows, from_covariance)  # same deterministic signs


def test_scores_and_maps_match_scikit_learn(
    model: Dfm, train: torch.Tensor, textures: dict[str, torch.Tensor]
) -> None:
    images = textures["defective"]
    with torch.no_grad():
        train_features = model.model.embed(train).flatten(1).double().numpy()
        pooled = model.model.embed(images)
    kept = model.model.components.shape[0]
    reference = PCA(n_components=kept, svd_solver="full").fit(train_features)
    assert reference.explained_variance_ratio_.sum() >= 0.97 - 1e-6
    assert reference.explained_variance_ratio_[:-1].sum() < 0.97
    features = pooled.flatten(1).double().numpy()
    projected = reference.transform(features)
    residual = features - reference.inverse_transform(projected)
    score, anomaly_map = scores(model, images)
    np.testing.assert_allclose(score.numpy(), (residual**2).sum(axis=1), rtol=1e-3)
    coarse = torch.from_numpy(residual**2).reshape(pooled.shape).sum(dim=1, keepdim=True)
    expected_map = F.interpolate(coarse.float(), size=(64, 64), mode="bilinear")[:, 0]
    torch.testing.assert_close(anomaly_map, expected_map, rtol=1e-3, atol=1e-3)

    nll = Dfm(**OPTIONS, score_type="nll")  # type: ignore[arg-type]
    nll.load_state_dict(model.state_dict())
    nll_score, nll_map = scores(nll.eval(), images)
    variances = reference.explained_variance_
    expected = (
        0.5 * (projected**2 / variances).sum(axis=1) + 0.5 * np.log(2 * math.pi * variances).sum()
    )
    np.testing.assert_allclose(nll_score.numpy(), expected, rtol=1e-3)
    assert torch.equal(nll_map, anomaly_map)  # the map is the reconstruction error either way


def test_defects_score_higher_and_maps_peak_on_them(
    model: Dfm,
    textures: dict[str, torch.Tensor],
    assert_peaks_on_blobs: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    normal_score, _ = scores(model, textures["normal"])
    defect_score, defect_map = scores(model, textures["defective"])
    labels = [0] * len(normal_score) + [1] * len(defect_score)
    assert roc_auc_score(labels, torch.cat([normal_score, defect_score]).numpy()) == 1.0
    assert_peaks_on_blobs(defect_map, textures["centers"])


def test_registered_fits_through_lightning_and_checkpoints_round_trip(
    train: torch.Tensor, textures: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    spec = get_plugin_manager().model("dfm")
    assert spec.family == "memory"
    assert spec.load() is Dfm
    items = [{"image": image, "gt_label": 0} for image in train]
    loader: DataLoader[dict[str, object]] = DataLoader(
        items,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=16,
        collate_fn=collate,
    )
    model = Dfm(score_type="nll")  # default pooling: one 112-channel vector per 64 px image
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=loader)
    assert model.model.mean.shape == (112,)
    trainer.save_checkpoint(tmp_path / "dfm.ckpt")
    loaded = Dfm.load_from_checkpoint(tmp_path / "dfm.ckpt").eval()
    assert loaded.hparams["score_type"] == "nll"
    images = torch.cat([textures["normal"], textures["defective"]])
    expected, got = scores(model.eval(), images), scores(loaded, images)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert float(expected[0][4:].min()) > float(expected[0][:4].max())


def test_forward_exports_with_a_dynamic_batch(
    model: Dfm, textures: dict[str, torch.Tensor]
) -> None:
    batch = torch.export.Dim("batch", max=256)
    program = torch.export.export(
        model.model, (textures["defective"][:2],), dynamic_shapes={"image": {0: batch}}
    )
    images = torch.cat([textures["normal"], textures["defective"][:1]])
    with torch.no_grad():
        expected = model.model(images)
        got = program.module()(images)
    # The eager backbone runs batches above 4 images in parts; the program runs them whole.
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_other_image_sizes_are_refused(model: Dfm) -> None:
    with pytest.raises(DataError, match=r"fitted on 64 pooled positions.*resize"):
        model(torch.rand(1, 3, 96, 64))
    with pytest.raises(DataError, match="smaller than pooling_kernel_size 4"):
        Dfm().model.embed(torch.rand(1, 3, 32, 32))


def test_unfitted_model_refuses_to_score() -> None:
    with pytest.raises(NotFittedError, match="PCA is empty"):
        DfmNet()(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="saw no training images"):
        Dfm().fit_end()


def test_mixed_training_sizes_are_refused() -> None:
    dfm = Dfm(**OPTIONS)  # type: ignore[arg-type]
    dfm.collect(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="one size"):
        dfm.collect(torch.rand(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="at least 2 training images"):
        dfm.fit_end()


def test_backbone_runtime_is_passed_to_the_feature_extractor() -> None:
    model = Dfm(backbone_runtime="channels_last")
    assert model.model.feature_extractor.runtime == "channels_last"
    assert model.hparams["backbone_runtime"] == "channels_last"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"pca_level": 0.0}, r"pca_level must lie in \(0, 1\]"),
        ({"pca_level": 1.5}, "pca_level"),
        ({"pca_level": True}, "pca_level"),
        ({"pooling_kernel_size": 0}, "pooling_kernel_size must be a positive int"),
        ({"score_type": "mahalanobis"}, "score_type must be one of 'fre', 'nll'"),
        ({"sigma": -1.0}, "sigma"),
        ({"backbone_runtime": "tensorrt"}, "unknown backbone runtime 'tensorrt'"),
        ({"stride": 3}, "available strides"),
        ({"stride": "16"}, "stride must be a positive int"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Dfm(**options)  # type: ignore[arg-type]
