from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import anomaly
import anomaly.builtin
from anomaly import AnomalyDataModule, AnomalyModule, ConfigError, Engine, ModelSpec, hookimpl


class MeanDistance(AnomalyModule):
    """Anomaly map: distance of each pixel from the mean training image."""

    trainer_arguments: ClassVar[dict[str, object]] = {"max_epochs": 1}

    def __init__(self, smoothing: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("mean", torch.zeros(0))
        self._sum: torch.Tensor | None = None
        self._count = 0

    def training_step(self, batch, batch_idx):
        total = batch.image.sum(0)
        self._sum = total if self._sum is None else self._sum + total
        self._count += len(batch)

    def fit_end(self) -> None:
        assert self._sum is not None
        self.mean = self._sum / self._count

    def forward(self, image):
        amap = (image - self.mean).abs().amax(1)
        return amap.flatten(1).amax(1), amap


class Items(Dataset):
    def __init__(self, images, labels, masks):
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {
            "image": self.images[index],
            "gt_label": int(self.labels[index]),
            "gt_mask": self.masks[index],
            "image_path": f"img_{index}.png",
        }


def _items(count, defective, seed):
    generator = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.02 * torch.randn(count, 3, 32, 32, generator=generator)
    masks = torch.zeros(count, 32, 32, dtype=torch.bool)
    labels = torch.zeros(count, dtype=torch.long)
    for index in range(count - defective, count):
        masks[index, 8:14, 10:16] = True
        images[index, :, 8:14, 10:16] = 0.9
        labels[index] = 1
    return Items(images.clamp(0, 1), labels, masks)


class TinyData(AnomalyDataModule):
    def __init__(self) -> None:
        super().__init__(image_size=32, train_batch_size=4, eval_batch_size=4)

    def setup(self, stage=None):
        self.train_data = _items(8, 0, 1)
        self.val_data = _items(6, 3, 2)
        self.test_data = _items(6, 3, 3)


class TinyPlugin:
    @hookimpl
    def anomaly_register_models(self):
        return [ModelSpec(name="mean_distance", target=f"{__name__}:MeanDistance", family="test")]


@pytest.fixture
def pm():
    manager = anomaly.PluginManager(discover=False)
    manager.register(anomaly.builtin, "core", distribution="anomaly-core")
    manager.register(TinyPlugin(), "tiny", distribution="tiny-plugin")
    return manager


@pytest.fixture
def fitted(pm):
    engine = Engine(plugin_manager=pm, accelerator="cpu")
    model = MeanDistance()
    data = TinyData()
    result = engine.fit(model, data)
    return engine, model, data, result


def test_fit_learns_thresholds_between_normal_and_defective(fitted):
    _, model, _, result = fitted
    assert result.train_images == 8
    assert bool(model.post_processor.fitted)
    assert model.input_size == (32, 32)
    # Defects sit at 0.9 against a 0.5 background: the threshold separates them.
    assert 0.1 < result.image_threshold < 0.5


def test_test_scores_defects_anomalous(fitted):
    engine, model, data, _ = fitted
    result = engine.test(model, data, metrics=[], visualizer=None)
    assert result.images == 6
    assert [row.pred_label for row in result.predictions] == [0, 0, 0, 1, 1, 1]
    assert all(0.0 <= row.pred_score <= 1.0 for row in result.predictions)


def test_predict_batches_carry_masks_on_defects(fitted):
    engine, model, data, _ = fitted
    result = engine.predict(model, data)
    last = result.batches[-1]
    assert last.pred_mask is not None
    assert last.pred_mask[-1, 8:14, 10:16].all()
    assert not last.pred_mask[-1, 20:, 20:].any()


def test_checkpoint_round_trip_reproduces_predictions(fitted, tmp_path):
    engine, model, data, _ = fitted
    path = engine.save_checkpoint(model, tmp_path / "model.ckpt")
    # The file loads with weights_only: no pickled code inside.
    torch.load(path, weights_only=True)
    loaded = engine.load_model(path)
    assert loaded.input_size == (32, 32)
    before = engine.predict(model, data).batches[0]
    after = engine.predict(loaded, data).batches[0]
    torch.testing.assert_close(before.anomaly_map, after.anomaly_map)
    torch.testing.assert_close(before.pred_score, after.pred_score)


def test_checkpoint_export_writes_model_and_metadata(fitted, tmp_path):
    engine, model, _, _ = fitted
    result = engine.export(model, tmp_path / "export", format="checkpoint")
    metadata = json.loads((result.path / "metadata.json").read_text())
    assert metadata["model"] == "mean_distance"
    assert metadata["input"]["height"] == 32
    assert metadata["post_processing"]["image_threshold"] == pytest.approx(
        float(model.post_processor.image_threshold)
    )
    reloaded = engine.load_model(result.path)
    assert bool(reloaded.post_processor.fitted)


def test_predict_on_a_folder_of_files(fitted, tmp_path):
    engine, model, _, _ = fitted
    folder = tmp_path / "images"
    folder.mkdir()
    normal = np.full((40, 50, 3), 110, dtype=np.uint8)
    defect = normal.copy()
    defect[10:20, 10:25] = 255
    Image.fromarray(normal).save(folder / "a.png")
    Image.fromarray(defect).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    result = engine.predict(model, folder)
    assert [Path(row.image_path).name for row in result.predictions] == ["a.png", "b.png"]
    assert [row.pred_label for row in result.predictions] == [0, 1]


def test_unfitted_model_cannot_be_tested(pm):
    engine = Engine(plugin_manager=pm, accelerator="cpu")
    with pytest.raises(ConfigError, match="fit it first"):
        engine.test(MeanDistance(), TinyData(), metrics=[])


def test_user_trainer_arguments_beat_the_models(pm):
    engine = Engine(plugin_manager=pm, accelerator="cpu", max_epochs=3)
    trainer = engine._build_trainer(MeanDistance())
    assert trainer.max_epochs == 3


def test_bad_trainer_arguments_are_a_config_error(pm):
    engine = Engine(plugin_manager=pm, no_such_argument=1)
    with pytest.raises(ConfigError, match="invalid engine arguments"):
        engine._build_trainer(MeanDistance())


def test_load_model_rejects_foreign_files(pm, tmp_path):
    engine = Engine(plugin_manager=pm)
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ConfigError, match="not an anomaly checkpoint"):
        engine.load_model(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        engine.load_model(tmp_path / "missing.ckpt")
