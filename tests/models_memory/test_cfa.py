"""CFA: descriptor, memory bank, coupled-hypersphere loss, Engine fitting, checkpoints, config."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset

from anomaly import AnomalyDataModule, ConfigError, Engine, get_plugin_manager
from anomaly_models_memory._common import NotFittedError
from anomaly_models_memory.cfa import Cfa, CfaNet, torch_model
from anomaly_models_memory.cfa.torch_model import (
    CoordConv2d,
    coupled_hypersphere_loss,
    kmeans,
    nearest_squared_distances,
)

# Two levels give a 16x16 grid on 64 px images: small enough for fast tests.
FAST = {"strides": [4, 8], "seed": 0}


# --- pieces ---------------------------------------------------------------------------------


def test_nearest_squared_distances_match_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 50, 8, generator=generator)
    bank = torch.randn(40, 8, generator=generator)
    expected = torch.cdist(query, bank.expand(3, -1, -1)).pow(2).topk(4, dim=-1, largest=False)
    for entries in (1 << 22, 7 * 40):  # one block; blocks of 7 positions (the last shorter)
        monkeypatch.setattr(torch_model, "_BLOCK_ENTRIES", entries)
        distances, indices = nearest_squared_distances(query, bank, 4)
        assert distances.shape == indices.shape == (3, 50, 4)
        assert torch.equal(indices, expected.indices)
        torch.testing.assert_close(distances, expected.values, rtol=1e-4, atol=1e-4)
    nearest, index = nearest_squared_distances(query, bank, 1)  # the min shortcut
    assert torch.equal(index[..., 0], expected.indices[..., 0])
    torch.testing.assert_close(nearest[..., 0], expected.values[..., 0], rtol=1e-4, atol=1e-4)


def test_loss_follows_attraction_and_repulsion() -> None:
    # One feature at the origin; bank rows at squared distances 1, 4, 9, 16, 25, 36.
    bank = torch.tensor([[float(i)] for i in range(1, 7)])
    target = torch.zeros(1, 1)
    radius = torch.tensor(1.5)  # r^2 = 2.25
    loss = coupled_hypersphere_loss(target, bank, radius, 3, 3, alpha=0.1)
    attraction = (0.0 + (4 - 2.25) + (9 - 2.25)) / 3  # the K = 3 nearest
    assert float(loss) == pytest.approx(attraction)  # negatives at 16, 25, 36 lie outside
    radius = torch.tensor(5.5)  # r^2 = 30.25: all attracted inside, two negatives too close
    loss = coupled_hypersphere_loss(target, bank, radius, 3, 3, alpha=0.1)
    assert float(loss) == pytest.approx(((30.25 - 16 - 0.1) + (30.25 - 25 - 0.1)) / 3)
    # Gradients reach the features and the radius, never the bank.
    target = torch.zeros(1, 1, requires_grad=True)
    radius = torch.tensor(1.5, requires_grad=True)
    bank.requires_grad_(True)
    coupled_hypersphere_loss(target, bank, radius, 3, 3).backward()
    assert target.grad is not None
    assert radius.grad is not None
    assert float(radius.grad) < 0  # attraction widens the sphere
    assert bank.grad is None


def test_kmeans_finds_separated_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    points = torch.cat([corner + torch.randn(30, 2, generator=generator) for corner in corners])
    centres = kmeans(points, 3, seed=0)
    found = sorted(tuple(round(v / 50) for v in centre.tolist()) for centre in centres)
    assert found == [(0, 0), (0, 1), (1, 0)]
    assert torch.equal(centres, kmeans(points, 3, seed=0))
    assert torch.equal(kmeans(points, 500), points)  # more centres than points: all of them


def test_coord_conv_sees_positions() -> None:
    layer = CoordConv2d(4, 6, generator=torch.Generator().manual_seed(0))
    out = layer(torch.ones(2, 4, 5, 7))
    assert out.shape == (2, 6, 5, 7)
    # A constant input gives different outputs at different places, through the coordinates.
    assert not torch.allclose(out[..., 0, 0], out[..., 4, 6])
    again = CoordConv2d(4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.conv.weight, layer.conv.weight)


def test_memory_bank_is_the_per_position_mean_compressed_by_gamma_c(
    textures: dict[str, torch.Tensor],
) -> None:
    net = CfaNet(strides=(4, 8))
    assert net.build_memory_bank(textures["train"].split(5)) == 12
    with torch.no_grad():
        mean = net.describe(textures["train"]).mean(dim=0)  # (D, 16, 16)
    torch.testing.assert_close(net.memory_bank, mean.flatten(1).T, rtol=1e-4, atol=1e-4)
    compressed = CfaNet(strides=(4, 8), gamma_c=4)
    compressed.build_memory_bank([textures["train"]])
    assert compressed.memory_bank.shape == (64, 64)  # 256 positions / 4; 24 + 40 channels


def test_loss_decreases_with_training(
    textures: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Cfa(**FAST)  # type: ignore[arg-type]
    model.build_memory_bank(textures["train"].split(4))
    optimizer = model.configure_optimizers()
    images = textures["train"][:6]
    model.model.loss(images).backward()  # one real pass: nothing reaches the frozen backbone
    assert all(p.grad is None for p in model.model.feature_extractor.parameters())
    assert model.model.descriptor.conv.weight.grad is not None
    assert not model.model.feature_extractor.training
    # The backbone is frozen, so its features are computed once for the remaining steps.
    with torch.no_grad():
        features = model.model.patch_features(images)
    monkeypatch.setattr(model.model, "patch_features", lambda image: features)
    losses = []
    for _ in range(12):
        loss = model.model.loss(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < 0.8 * losses[0]
    assert float(model.model.radius.detach()) > 1e-5  # the soft boundary is learned


def test_unfitted_model_refuses_to_score() -> None:
    with pytest.raises(NotFittedError, match="memory bank is empty"):
        Cfa(**FAST)(torch.rand(1, 3, 64, 64))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"gamma_c": 0}, "gamma_c must be an int >= 1"),
        ({"gamma_d": 1000}, r"gamma_d 1000 must lie in \[1, 152\]"),
        ({"num_nearest": 0}, "num_nearest"),
        ({"num_hard_negatives": -1}, "num_hard_negatives must be an int >= 0"),
        ({"radius": -1.0}, "radius"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"lr": 0}, "lr must be a finite number > 0"),
        ({"weight_decay": "high"}, "weight_decay"),
        ({"patch_size": 2}, "patch_size must be odd"),
        ({"sigma": -1.0}, "sigma"),
        ({"learn_radius": "yes"}, "learn_radius"),
        ({"strides": [3]}, "available strides"),
        ({"backbone_runtime": "fast"}, "backbone runtime"),
    ],
)
def test_bad_options_raise_config_error(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Cfa(**options)  # type: ignore[arg-type]


# --- through the Engine ---------------------------------------------------------------------


class _Items(Dataset[dict[str, object]]):
    def __init__(self, images: torch.Tensor, labels: list[int], masks: torch.Tensor) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {
            "image": self.images[index],
            "gt_label": self.labels[index],
            "gt_mask": self.masks[index],
            "image_path": f"{index:03d}.png",
        }


class _Textures(AnomalyDataModule):
    """The shared striped textures: 12 good training images, 4 good and 4 defective tests."""

    def __init__(self, textures: dict[str, torch.Tensor]) -> None:
        super().__init__(image_size=64, train_batch_size=4, eval_batch_size=8)
        self.textures = textures

    def setup(self, stage: str | None = None) -> None:
        train = self.textures["train"]
        test = torch.cat([self.textures["normal"], self.textures["defective"]])
        masks = torch.zeros(8, 64, 64, dtype=torch.bool)
        for index, (row, col) in enumerate(self.textures["centers"].tolist(), start=4):
            masks[index, row - 8 : row + 8, col - 8 : col + 8] = True
        self.train_data = _Items(train, [0] * 12, torch.zeros(12, 64, 64, dtype=torch.bool))
        self.val_data = self.test_data = _Items(test, [0] * 4 + [1] * 4, masks)


@pytest.fixture(scope="module")
def engine_fit(
    textures: dict[str, torch.Tensor],
) -> tuple[Engine, Cfa, _Textures, Any]:
    engine = Engine(accelerator="cpu", max_epochs=2)
    model = Cfa(**FAST)  # type: ignore[arg-type]
    data = _Textures(textures)
    result = engine.fit(model, data)
    return engine, model, data, result


def test_registered_as_a_memory_model() -> None:
    spec = get_plugin_manager().model("cfa")
    assert spec.family == "memory"
    assert spec.load() is Cfa
    assert Cfa.trainer_arguments["max_epochs"] == 30


def test_engine_fit_trains_and_scores_defects_higher(
    engine_fit: tuple[Engine, Cfa, _Textures, Any], textures: dict[str, torch.Tensor]
) -> None:
    engine, model, _, result = engine_fit
    assert result.train_images == 12
    assert engine.trainer is not None
    assert engine.trainer.current_epoch == 2  # two epochs of 3 steps ran
    assert engine.trainer.global_step == 6
    assert model.model.memory_bank.shape == (256, 64)
    assert bool(model.post_processor.fitted)
    model.eval()
    with torch.no_grad():
        normal, _ = model(textures["normal"])
        defective, defect_map = model(textures["defective"])
    labels = [0] * 4 + [1] * 4
    assert roc_auc_score(labels, torch.cat([normal, defective]).tolist()) >= 0.9
    assert defect_map.shape == (4, 64, 64)
    torch.testing.assert_close(defective, defect_map.flatten(1).max(dim=1).values)


def test_checkpoint_round_trip_gives_identical_scores(
    engine_fit: tuple[Engine, Cfa, _Textures, Any],
    textures: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    engine, model, _, _ = engine_fit
    path = engine.save_checkpoint(model, tmp_path / "cfa.ckpt")
    loaded = engine.load_model(path)
    assert isinstance(loaded, Cfa)
    assert loaded.model.memory_bank.shape == model.model.memory_bank.shape
    model.eval()
    images = torch.cat([textures["normal"], textures["defective"]])
    with torch.no_grad():
        expected = model(images)
        got = loaded(images)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert torch.equal(loaded.model.radius, model.model.radius)


def test_forward_exports_with_any_batch_size(
    engine_fit: tuple[Engine, Cfa, _Textures, Any], textures: dict[str, torch.Tensor]
) -> None:
    _, model, _, _ = engine_fit
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        model, (textures["normal"][:2],), dynamic_shapes={"image": {0: batch}}
    )
    images = torch.cat([textures["normal"], textures["defective"][:1]])  # another batch size
    with torch.no_grad():
        expected = model(images)
        got = program.module()(images)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
