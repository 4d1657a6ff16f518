"""PatchCore: coreset, neighbour search, Eq. 7 re-weighting, fitting, checkpoints, config."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from anomaly import ConfigError, get_plugin_manager
from anomaly._batch import collate
from anomaly.backbones import imagenet_normalize
from anomaly_models_memory import NotFittedError, Patchcore, PatchcoreNet
from anomaly_models_memory.patchcore.torch_model import (
    greedy_coreset,
    nearest_neighbors,
    reweight_scores,
)

PeakCheck = Callable[[torch.Tensor, torch.Tensor], None]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tensors here are tiny: with one thread no step waits on OpenMP's synchronization, which
    # dominates (ten times slower) when other processes share the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fitted(textures: dict[str, torch.Tensor], **options: object) -> Patchcore:
    model = Patchcore(**options)  # type: ignore[arg-type]
    model.collect(textures["train"])
    model.fit_end()
    return model.eval()


@pytest.fixture(scope="module")
def model(textures: dict[str, torch.Tensor]) -> Patchcore:
    # Two levels give an 8x8 grid on 64 px images: fine enough to localize a 12 px blob.
    return fitted(textures, strides=[8, 16])


# --- coreset --------------------------------------------------------------------------------


def test_coreset_covers_every_cluster_once() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    points = torch.cat([corner + torch.randn(50, 2, generator=generator) for corner in corners])
    for mode in ("exact", "approximate"):
        for seed in range(3):
            chosen = greedy_coreset(points, 4, seed=seed, mode=mode)
            clusters = sorted((chosen // 50).tolist())
            assert clusters == [0, 1, 2, 3]  # k-center: one center per well-separated cluster


def test_coreset_radius_is_within_twice_the_best() -> None:
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(300, 3, generator=generator)
    chosen = greedy_coreset(points, 30, seed=0)
    radius = torch.cdist(points, points[chosen]).min(dim=1).values.max()
    # Greedy k-center is a 2-approximation; random subsets of the same size do much worse.
    random_radius = min(
        float(torch.cdist(points, points[torch.randperm(300)[:30]]).min(dim=1).values.max())
        for _ in range(20)
    )
    assert float(radius) < random_radius


def test_coreset_partitions_split_the_count_exactly() -> None:
    points = torch.randn(1000, 8, generator=torch.Generator().manual_seed(2))
    chosen = greedy_coreset(points, 101, block_size=300, seed=0)
    assert chosen.numel() == 101
    assert torch.unique(chosen).numel() == 101
    assert torch.equal(chosen, greedy_coreset(points, 101, block_size=300, seed=0))
    assert not torch.equal(chosen, greedy_coreset(points, 101, block_size=300, seed=1))


def test_coreset_projects_wide_features_and_handles_duplicates() -> None:
    points = torch.randn(40, 300, generator=torch.Generator().manual_seed(3))
    for mode in ("exact", "approximate"):
        assert torch.unique(greedy_coreset(points, 10, projection_dim=16, mode=mode)).numel() == 10
        repeated = torch.zeros(20, 4)
        assert greedy_coreset(repeated, 5, mode=mode).numel() == 1  # one row covers them all
        assert torch.equal(greedy_coreset(points, 50, mode=mode), torch.arange(40))


# --- neighbour search and re-weighting ------------------------------------------------------


def test_nearest_neighbors_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(4)
    query, bank = torch.randn(16, 5, generator=generator), torch.randn(70, 5, generator=generator)
    for k in (1, 3):
        distance, index = nearest_neighbors(query, bank, k=k)
        expected_distance, expected_index = torch.cdist(query, bank).topk(k, largest=False)
        torch.testing.assert_close(distance, expected_distance, atol=1e-4, rtol=1e-4)
        assert torch.equal(index, expected_index)


def test_reweighting_follows_equation_7() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [10.0, 10.0]])
    patches = torch.tensor([[[0.5, 0.0], [0.0, -2.0]]])  # (B=1, P=2, D=2)
    distance, index = nearest_neighbors(patches[0], bank, k=1)
    patch_scores, nearest = distance.T, index.T  # worst patch: (0, -2), s* = 2, m* = (0, 0)
    score = reweight_scores(patch_scores, nearest, patches, bank, num_neighbors=3)
    # N_3(m*) = (0,0), (1,0), (0,3); distances from m_test* = (0,-2): 2, sqrt(5), 5.
    by_hand = (1 - math.exp(2) / (math.exp(2) + math.exp(math.sqrt(5)) + math.exp(5))) * 2
    torch.testing.assert_close(score, torch.tensor([by_hand]))


# --- the model ------------------------------------------------------------------------------


def test_shapes_and_determinism(model: Patchcore, textures: dict[str, torch.Tensor]) -> None:
    images = torch.cat([textures["normal"], textures["defective"]])
    with torch.no_grad():
        score, anomaly_map = model(images)
        again, again_map = model(images)
    assert score.shape == (8,)
    assert anomaly_map.shape == (8, 64, 64)
    assert torch.equal(score, again)
    assert torch.equal(anomaly_map, again_map)
    other = fitted(textures, strides=[8, 16])
    assert torch.equal(other.model.memory_bank, model.model.memory_bank)


def test_defects_score_higher_and_maps_peak_on_them(
    model: Patchcore, textures: dict[str, torch.Tensor], assert_peaks_on_blobs: PeakCheck
) -> None:
    with torch.no_grad():
        normal_score, _ = model(textures["normal"])
        defect_score, defect_map = model(textures["defective"])
    assert float(defect_score.min()) > float(normal_score.max())
    assert_peaks_on_blobs(defect_map, textures["centers"])


def test_bank_size_follows_coreset_ratio(
    model: Patchcore, textures: dict[str, torch.Tensor]
) -> None:
    patches = textures["train"].shape[0] * 8 * 8  # 64 px at stride 8
    assert model.model.memory_bank.shape == (math.ceil(0.1 * patches), 40 + 112)
    assert model.model.memory_bank.dtype == torch.float32
    assert model.coreset_seconds > 0


def test_any_image_size_is_scored(model: Patchcore) -> None:
    with torch.no_grad():
        score, anomaly_map = model(torch.rand(1, 3, 96, 80))
    assert score.shape == (1,)
    assert anomaly_map.shape == (1, 96, 80)


def test_state_dict_round_trip_resizes_the_bank(
    model: Patchcore, textures: dict[str, torch.Tensor]
) -> None:
    small = Patchcore(strides=[8, 16], coreset_ratio=0.5)
    small.collect(textures["train"][:2])
    small.fit_end()
    assert small.model.memory_bank.shape[0] != model.model.memory_bank.shape[0]
    small.load_state_dict(model.state_dict())  # different bank size: resized by the base class
    fresh = Patchcore(strides=[8, 16])
    fresh.load_state_dict(model.state_dict())  # empty bank
    small.eval()
    fresh.eval()
    with torch.no_grad():
        expected = model(textures["defective"])
        for other in (small, fresh):
            got = other(textures["defective"])
            torch.testing.assert_close(got[0], expected[0])
            torch.testing.assert_close(got[1], expected[1])


def test_unfitted_model_refuses_to_score() -> None:
    with pytest.raises(NotFittedError, match="memory bank is empty"):
        Patchcore()(torch.rand(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="no training images"):
        Patchcore().fit_end()


def test_two_levels_embed_at_the_finer_stride(textures: dict[str, torch.Tensor]) -> None:
    net = PatchcoreNet(strides=(8, 16), embedding_dim=64)
    embedding = net.embed(textures["train"][:2])
    assert embedding.shape == (2, 64, 8, 8)


def test_patch_padding_changes_border_patches_only(textures: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    zeros = PatchcoreNet(strides=(8,), patch_padding="zeros")
    exclude = PatchcoreNet(strides=(8,), patch_padding="exclude")
    exclude.load_state_dict(zeros.state_dict())
    with torch.no_grad():
        features = zeros.feature_extractor(imagenet_normalize(textures["train"][:2]))[0]
        padded, inside = zeros.embed(textures["train"][:2]), exclude.embed(textures["train"][:2])
    # Inner patches see no padding: both agree there.
    torch.testing.assert_close(padded[..., 1:-1, 1:-1], inside[..., 1:-1, 1:-1])
    # A corner averages 4 of 9 cells: zero padding scales the in-map average by 4 / 9.
    corner = features[..., :2, :2].mean(dim=(-2, -1))
    torch.testing.assert_close(inside[..., 0, 0], corner, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded[..., 0, 0], corner * 4 / 9, rtol=1e-5, atol=1e-6)


def test_without_reweighting_the_score_is_the_largest_patch_distance(
    textures: dict[str, torch.Tensor],
) -> None:
    plain = fitted(textures, num_neighbors=0)
    with torch.no_grad():
        score, _ = plain(textures["defective"])
        embedding = plain.model.embed(textures["defective"])
    patches = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    distance, _ = nearest_neighbors(patches, plain.model.memory_bank)
    torch.testing.assert_close(score, distance.reshape(4, -1).max(dim=1).values)
    reweighted = fitted(textures)
    with torch.no_grad():
        assert not torch.allclose(reweighted(textures["defective"])[0], score)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"coreset_ratio": 1.5}, "coreset_ratio"),
        ({"num_neighbors": 1}, "num_neighbors"),
        ({"num_neighbors": -2}, "num_neighbors"),
        ({"patch_size": 2}, "patch_size"),
        ({"sigma": -1.0}, "sigma"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"coreset_block_size": 0}, "coreset_block_size"),
        ({"strides": [7]}, "available strides"),
        ({"strides": "16"}, "list of ints"),
        ({"backbone": "resnet_nope"}, "not a timm model"),
        ({"embedding_dim": 1000}, "embedding_dim"),
        ({"coreset_mode": "fast"}, "coreset_mode must be one of 'exact', 'approximate'"),
        ({"memory_bank_size": 0}, "memory_bank_size"),
        ({"memory_bank_size": 2.5}, "memory_bank_size"),
        ({"bank_dtype": "bfloat16"}, "bank_dtype must be one of 'float32', 'float16'"),
        ({"search_backend": "annoy"}, "search_backend must be one of 'torch', 'faiss'"),
        ({"backbone_runtime": "tensorrt"}, "runtime"),
        ({"coreset_threads": 0}, "coreset_threads"),
        ({"patch_padding": "reflect"}, "patch_padding must be one of 'zeros', 'exclude'"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Patchcore(**options)  # type: ignore[arg-type]


class _ProgressProbe(pl.Callback):
    """Stands for anomaly.Engine's progress bridge: a callback holding ``progress``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []

    def progress(self, phase: str, done: int, total: int | None) -> None:
        self.calls.append((phase, done, total))


def test_registered_and_fits_through_lightning(textures: dict[str, torch.Tensor]) -> None:
    spec = get_plugin_manager().model("patchcore")
    assert spec.family == "memory"
    assert spec.load() is Patchcore
    items = [{"image": image, "gt_label": 0} for image in textures["train"]]
    loader: DataLoader[dict[str, object]] = DataLoader(
        items,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=4,
        collate_fn=collate,
    )
    model = Patchcore(strides=[16], coreset_mode="exact")
    backbone_before = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    probe = _ProgressProbe()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[probe],
    )
    trainer.fit(model, train_dataloaders=loader)
    assert model.model.memory_bank.shape[0] == math.ceil(0.1 * 12 * 16)
    extractor = model.model.feature_extractor
    assert not any(module.training for module in extractor.modules())
    for key, value in extractor.state_dict().items():  # batch norm statistics untouched
        torch.testing.assert_close(value, backbone_before[key])
    assert model.hparams["coreset_ratio"] == 0.1
    # The coreset selection reported its progress through the trainer's progress callback.
    assert probe.calls[-1] == ("coreset", 20, 20)
    assert all(phase == "coreset" for phase, _, _ in probe.calls)
