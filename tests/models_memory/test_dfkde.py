"""DFKDE: kernel density against scipy, PCA against scikit-learn, fitting, checkpoints, config."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import gaussian_kde
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from anomaly import ConfigError, get_plugin_manager
from anomaly._batch import collate
from anomaly_models_memory import NotFittedError
from anomaly_models_memory._common import pca_from_covariance
from anomaly_models_memory.dfkde import Dfkde, DfkdeNet, torch_model
from anomaly_models_memory.dfkde.torch_model import (
    BandwidthRule,
    bandwidth_factor,
    fit_gaussian_kde,
    kde_log_density,
)


def flipped(images: torch.Tensor) -> torch.Tensor:
    """Return ``images`` and their three flips: more normal textures (other stripe phases)."""
    return torch.cat([images, images.flip(-1), images.flip(-2), images.flip(-2, -1)])


@pytest.fixture(scope="module")
def train(textures: dict[str, torch.Tensor]) -> torch.Tensor:
    """48 normal training images: they span more than the 16 PCA components kept."""
    return flipped(textures["train"])


@pytest.fixture(scope="module")
def vectors(train: torch.Tensor) -> torch.Tensor:
    """The pooled feature vectors of the training images, (48, 320)."""
    with torch.no_grad():
        return Dfkde().model.embed(train)


def fitted(vectors: torch.Tensor, **options: object) -> Dfkde:
    model = Dfkde(**options)  # type: ignore[arg-type]
    model.fit_density(vectors)
    return model.eval()


@pytest.fixture(scope="module")
def model(vectors: torch.Tensor) -> Dfkde:
    return fitted(vectors)


def scores(model: Dfkde, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(images)  # type: ignore[no-any-return]


@pytest.mark.parametrize("rule", ["scott", "silverman", 0.4])
def test_kernel_density_matches_scipy(rule: str | float) -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    points = torch.randn(300, 5, generator=generator, dtype=torch.float64) @ mixing
    query = 2.0 * torch.randn(40, 5, generator=generator, dtype=torch.float64)
    kde = fit_gaussian_kde(points, BandwidthRule(rule) if isinstance(rule, str) else rule)
    ours = kde_log_density(query, kde.whitening, kde.centres, kde.log_norm)
    expected = gaussian_kde(points.numpy().T, bw_method=rule).logpdf(query.numpy().T)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_kernel_density_over_several_blocks_of_centres_matches_scipy() -> None:
    points = torch.randn(5000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    query = torch.linspace(-4, 4, 20, dtype=torch.float64).reshape(10, 2)
    kde = fit_gaussian_kde(points)  # 5000 centres: two blocks of at most 4096
    ours = kde_log_density(query, kde.whitening, kde.centres, kde.log_norm)
    expected = gaussian_kde(points.numpy().T).logpdf(query.numpy().T)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_far_queries_get_finite_ordered_log_densities() -> None:
    points = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kde = fit_gaussian_kde(points)
    far = torch.tensor([[100.0, 0.0, 0.0], [200.0, 0.0, 0.0]], dtype=torch.float64)
    log_density = kde_log_density(far, kde.whitening, kde.centres, kde.log_norm)
    assert torch.isfinite(log_density).all()  # a density would underflow to 0 here
    assert float(log_density[0]) > float(log_density[1])


@pytest.mark.parametrize("block", [4096, 7])
def test_leave_one_out_density_drops_each_points_own_kernel(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_model, "_CENTRE_BLOCK", block)  # 7: sums over five blocks
    points = torch.randn(30, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kde = fit_gaussian_kde(points)
    full = kde_log_density(points, kde.whitening, kde.centres, kde.log_norm).exp()
    count = points.shape[0]
    own_kernel = math.exp(kde.log_norm + math.log(count))  # one kernel's peak value
    expected = torch.log((count * full - own_kernel) / (count - 1))
    loo = kde_log_density(points, kde.whitening, kde.centres, kde.log_norm, exclude_self=True)
    torch.testing.assert_close(loo, expected)


def test_bandwidth_rules() -> None:
    assert bandwidth_factor(BandwidthRule.SCOTT, 100, 6) == pytest.approx(100 ** (-1 / 10))
    assert bandwidth_factor(BandwidthRule.SILVERMAN, 100, 6) == pytest.approx(200 ** (-1 / 10))
    assert bandwidth_factor(0.3, 100, 6) == 0.3


def test_pca_matches_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(3)
    data = torch.randn(200, 10, generator=generator, dtype=torch.float64)
    data = data @ torch.randn(10, 10, generator=generator, dtype=torch.float64) + 5.0
    components, variances = pca_from_covariance(torch.cov(data.T), n_components=4)
    reference = PCA(n_components=4, svd_solver="full").fit(data.numpy())
    np.testing.assert_allclose(variances.numpy(), reference.explained_variance_, rtol=1e-9)
    # Axes are defined up to sign.
    np.testing.assert_allclose(
        np.abs(components.numpy()), np.abs(reference.components_), rtol=1e-7, atol=1e-9
    )


def test_fitted_pipeline_matches_scikit_learn_and_scipy(
    model: Dfkde, vectors: torch.Tensor, textures: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        test = model.model.embed(textures["defective"]).double().numpy()
    pca = PCA(n_components=16, svd_solver="full").fit(vectors.double().numpy())
    reduced = pca.transform(vectors.double().numpy())
    scale = np.linalg.norm(reduced, axis=1).max()
    expected = -gaussian_kde((reduced / scale).T).logpdf((pca.transform(test) / scale).T)
    score, _ = scores(model, textures["defective"])
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-3, atol=1e-3)


def test_defects_score_higher(model: Dfkde, textures: dict[str, torch.Tensor]) -> None:
    normal_score, normal_map = scores(model, textures["normal"])
    defect_score, _ = scores(model, textures["defective"])
    labels = [0] * len(normal_score) + [1] * len(defect_score)
    assert roc_auc_score(labels, torch.cat([normal_score, defect_score]).numpy()) == 1.0
    # The default map is the image score everywhere.
    assert normal_map.shape == (4, 64, 64)
    torch.testing.assert_close(normal_map, normal_score.view(-1, 1, 1).expand(-1, 64, 64))


def test_occlusion_map_is_the_score_drop_without_each_cell(
    model: Dfkde, textures: dict[str, torch.Tensor]
) -> None:
    occluding = Dfkde(anomaly_map_mode="occlusion", sigma=0.0)
    occluding.load_state_dict(model.state_dict())
    occluding.eval()
    # 128 px at stride 32: 4 x 4 cells of 32 px.
    image = F.interpolate(textures["defective"][:1], size=(128, 128), mode="bilinear")
    with torch.no_grad():
        score, anomaly_map = occluding(image)
        feature = occluding.model.level_features(image)[0]  # (1, 320, 4, 4)
        cells = feature.flatten(2)[0].T  # (16, 320)
        without = (cells.sum(dim=0) - cells) / 15
        expected = score - occluding.model.negative_log_density(without)
        coarse = occluding.model.occlusion_map([feature], score)
        torch.testing.assert_close(score, model(image)[0])
    torch.testing.assert_close(coarse.flatten(), expected, rtol=1e-4, atol=1e-4)
    upsampled = F.interpolate(coarse[None], size=(128, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(anomaly_map, upsampled[0])


def test_training_points_are_subsampled_and_scaled(
    vectors: torch.Tensor, textures: dict[str, torch.Tensor]
) -> None:
    small = fitted(vectors, max_training_points=20)
    assert small.model.centres.shape == (20, 16)
    assert small.model.pca_components.shape == (16, 320)  # PCA still sees every image
    normed = fitted(vectors, feature_scaling_method="norm")
    with torch.no_grad():
        reduced = normed.model.reduce(normed.model.embed(textures["normal"]))
    torch.testing.assert_close(reduced.norm(dim=1), torch.ones(4))


def test_components_are_capped_by_the_training_rank(
    vectors: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    capped = fitted(vectors[:12])
    assert capped.model.pca_components.shape == (11, 320)  # 12 images span 11 dimensions
    assert "keeps 11 PCA components instead of 16" in caplog.text


def test_logistic_calibration_keeps_the_ranking(
    model: Dfkde, vectors: torch.Tensor, textures: dict[str, torch.Tensor]
) -> None:
    calibrated = fitted(vectors, score_calibration="logistic")
    images = torch.cat([textures["normal"], textures["defective"]])
    raw, _ = scores(model, images)
    probability, _ = scores(calibrated, images)
    assert calibrated.model.calibration.shape == (2,)
    assert bool(((probability >= 0) & (probability <= 1)).all())
    # Monotone: sorted by raw score, probabilities never decrease (they saturate at 1).
    assert bool((probability[raw.argsort()].diff() >= 0).all())
    centre, scale = calibrated.model.calibration.tolist()
    torch.testing.assert_close(probability, torch.sigmoid((raw - centre) / scale))


def test_registered_fits_through_lightning_and_checkpoints_round_trip(
    train: torch.Tensor, textures: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    spec = get_plugin_manager().model("dfkde")
    assert spec.family == "memory"
    assert spec.load() is Dfkde
    items = [{"image": image, "gt_label": 0} for image in train]
    loader: DataLoader[dict[str, object]] = DataLoader(
        items,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=16,
        collate_fn=collate,
    )
    model = Dfkde(score_calibration="logistic")
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
    assert model.model.centres.shape == (48, 16)
    trainer.save_checkpoint(tmp_path / "dfkde.ckpt")
    loaded = Dfkde.load_from_checkpoint(tmp_path / "dfkde.ckpt").eval()
    assert loaded.hparams["score_calibration"] == "logistic"
    images = torch.cat([textures["normal"], textures["defective"]])
    expected, got = scores(model.eval(), images), scores(loaded, images)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_forward_exports_with_a_dynamic_batch(
    model: Dfkde, textures: dict[str, torch.Tensor]
) -> None:
    batch = torch.export.Dim("batch", max=256)
    program = torch.export.export(
        model.model, (textures["defective"][:2],), dynamic_shapes={"image": {0: batch}}
    )
    images = torch.cat([textures["normal"], textures["defective"][:1]])
    with torch.no_grad():
        expected = model.model(images)
        got = program.module()(images)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_unfitted_model_refuses_to_score() -> None:
    with pytest.raises(NotFittedError, match="density is empty"):
        DfkdeNet()(torch.rand(1, 3, 64, 64))


def test_backbone_runtime_is_passed_to_the_feature_extractor() -> None:
    model = Dfkde(backbone_runtime="channels_last")
    assert model.model.feature_extractor.runtime == "channels_last"
    assert model.hparams["backbone_runtime"] == "channels_last"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_pca_components": 0}, "n_pca_components must be an int >= 1"),
        ({"n_pca_components": 2.5}, "n_pca_components"),
        ({"max_training_points": 1}, "max_training_points"),
        ({"feature_scaling_method": "max"}, r"feature_scaling_method must be one of 'norm'"),
        ({"bandwidth": "wide"}, "bandwidth must be one of 'scott', 'silverman'"),
        ({"bandwidth": -1.0}, "positive number"),
        ({"score_calibration": "isotonic"}, "score_calibration"),
        ({"anomaly_map_mode": "pixel"}, "anomaly_map_mode"),
        ({"sigma": -1.0}, "sigma"),
        ({"backbone_runtime": "tensorrt"}, "unknown backbone runtime 'tensorrt'"),
        ({"strides": [3]}, "available strides"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Dfkde(**options)  # type: ignore[arg-type]


def test_too_few_training_images_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 2 training images"):
        Dfkde().fit_density(torch.rand(1, 320))
    with pytest.raises(ConfigError, match="saw no training images"):
        Dfkde().fit_end()
