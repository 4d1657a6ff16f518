from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomaly import Batch, ConfigError, DataError
from anomaly_data import Folder, ValSplitMode


def _paths(data) -> list[str]:
    return [item.image_path.name for item in data.samples]


def test_folder_with_masks(defect_folder: Path) -> None:
    dm = Folder(
        defect_folder, abnormal_dirs=["crack", "hole"], mask_dir="masks", image_size=32, seed=3
    )
    dm.setup()
    train, val, test = dm.summaries
    assert (train.split, val.split, test.split) == ("train", "val", "test")
    assert train.images == train.normal == 16
    assert train.source == "'good/' (80 % of normal)"
    # 4 held-out normals + 7 anomalous images, halved per folder.
    assert val.images + test.images == 11
    assert val.abnormal + test.abnormal == 7
    assert val.masks == val.abnormal
    assert test.masks == test.abnormal
    assert "'crack/', 'hole/'" in test.source

    for item in (dm.test_data[i] for i in range(len(dm.test_data))):
        image, mask = item["image"], item["gt_mask"]
        assert image.shape == (3, 32, 32)
        assert image.dtype == torch.float32
        assert float(image.min()) >= 0.0
        assert float(image.max()) <= 1.0
        assert mask.shape == (32, 32)
        assert mask.dtype == torch.bool
        # Anomalous images get their (non-empty) mask; normal ones an all-False mask.
        assert bool(mask.any()) == (item["gt_label"] == 1)
        assert Path(item["image_path"]).is_file()

    batch = next(iter(dm.test_dataloader()))
    assert isinstance(batch, Batch)
    assert batch.gt_mask is not None
    assert batch.gt_mask.shape[1:] == (32, 32)


def test_folder_without_masks(defect_folder: Path) -> None:
    dm = Folder(defect_folder, abnormal_dirs="crack", image_size=(32, 48))
    dm.setup()
    item = dm.test_data[0]
    assert item["gt_mask"] is None
    assert item["image"].shape == (3, 32, 48)
    assert all(s.masks == 0 for s in dm.summaries)
    batch = next(iter(dm.val_dataloader()))
    assert batch.gt_mask is None
    assert batch.gt_label is not None


def test_masks_in_flat_folder_and_nested_images(tmp_path: Path, write_image) -> None:
    root = tmp_path / "d"
    for index in range(4):
        write_image(root / "ok" / f"{index}.jpg", seed=index)
    write_image(root / "bad" / "lot1" / "a.bmp")
    write_image(root / "bad" / "lot2" / "b.tif")
    write_image(root / "gt" / "a_mask.bmp", mask=True)
    write_image(root / "gt" / "b.png", mask=True)
    dm = Folder(root, normal_dir="ok", abnormal_dirs="bad", mask_dir="gt", val_split="same_as_test")
    dm.setup()
    masks = {s.image_path.name: s.mask_path.name for s in dm.test_data.samples if s.mask_path}
    assert masks == {"a.bmp": "a_mask.bmp", "b.tif": "b.png"}


def test_ambiguous_flat_mask_is_an_error(tmp_path: Path, write_image) -> None:
    root = tmp_path / "d"
    for index in range(4):
        write_image(root / "good" / f"{index}.png")
    write_image(root / "crack" / "000.png")
    write_image(root / "hole" / "000.png")
    write_image(root / "masks" / "000_mask.png", mask=True)
    dm = Folder(root, abnormal_dirs=["crack", "hole"], mask_dir="masks")
    with pytest.raises(DataError, match="matches both"):
        dm.setup()


def test_hidden_and_non_image_files_are_ignored(defect_folder: Path, write_image) -> None:
    good = defect_folder / "good"
    write_image(good / ".hidden.png")
    write_image(good / ".ipynb_checkpoints" / "g00-checkpoint.png")
    (good / "notes.txt").write_text("not an image")
    (good / "Thumbs.db").write_bytes(b"\x00\x01")
    (good / "README").write_text("x")
    dm = Folder(defect_folder, abnormal_dirs="crack")
    dm.setup()
    names = _paths(dm.train_data) + _paths(dm.test_data) + _paths(dm.val_data)
    assert sum(name.startswith("g") for name in names) == 20
    assert not any(name.startswith(".") or name.endswith((".txt", ".db")) for name in names)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_image_modes_load_as_rgb(tmp_path: Path, write_image, mode: str) -> None:
    root = tmp_path / "d"
    suffix = ".jpg" if mode == "CMYK" else ".png"
    for index in range(3):
        write_image(root / "good" / f"{index}{suffix}", mode=mode, seed=index)
    dm = Folder(root, image_size=32, val_split="same_as_test")
    dm.setup()
    image = dm.train_data[0]["image"]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


def test_corrupt_image_names_the_file(defect_folder: Path) -> None:
    (defect_folder / "crack" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    truncated = (defect_folder / "good" / "g00.png").read_bytes()[:200]
    (defect_folder / "good" / "g00.png").write_bytes(truncated)
    dm = Folder(defect_folder, abnormal_dirs="crack")
    with pytest.raises(DataError, match=r"2 of \d+ .*cannot be read \(first: '[^']*g00\.png'"):
        dm.setup()


def test_corrupt_mask_is_reported(defect_folder: Path) -> None:
    (defect_folder / "masks" / "crack" / "crack1_mask.png").write_bytes(b"garbage")
    dm = Folder(defect_folder, abnormal_dirs="crack", mask_dir="masks")
    with pytest.raises(DataError, match=r"crack1_mask\.png"):
        dm.setup()


def test_missing_root_and_folders(tmp_path: Path, defect_folder: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Folder(tmp_path / "nowhere").setup()
    with pytest.raises(DataError, match=r"goood' does not exist; did you mean 'good'\?"):
        Folder(defect_folder, normal_dir="goood").setup()
    with pytest.raises(DataError, match="anomalous image folder"):
        Folder(defect_folder, abnormal_dirs=["crack", "scratch"]).setup()
    with pytest.raises(DataError, match="mask folder"):
        Folder(defect_folder, abnormal_dirs="crack", mask_dir="gt").setup()


def test_empty_folder(defect_folder: Path) -> None:
    empty = defect_folder / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"'[^']*empty' holds no images"):
        Folder(defect_folder, abnormal_dirs="empty").setup()


def test_missing_mask(defect_folder: Path) -> None:
    (defect_folder / "masks" / "hole" / "hole1.png").unlink()
    dm = Folder(defect_folder, abnormal_dirs=["crack", "hole"], mask_dir="masks")
    with pytest.raises(DataError, match=r"1 of 3 anomalous images .*hole1\.png.*no mask|no mask"):
        dm.setup()


def test_mask_size_mismatch_names_both_sizes(defect_folder: Path, write_image) -> None:
    write_image(defect_folder / "masks" / "crack" / "crack2_mask.png", size=(20, 30), mask=True)
    dm = Folder(defect_folder, abnormal_dirs="crack", mask_dir="masks")
    with pytest.raises(DataError, match=r"crack2_mask\.png' is 20x30 but image .* is 40x48"):
        dm.setup()


def test_splits_are_seeded(defect_folder: Path) -> None:
    def split(seed: int) -> tuple[list[str], list[str], list[str]]:
        dm = Folder(defect_folder, abnormal_dirs=["crack", "hole"], seed=seed)
        dm.setup()
        return _paths(dm.train_data), _paths(dm.val_data), _paths(dm.test_data)

    first = split(0)
    assert split(0) == first
    assert split(1) != first
    train, val, test = first
    assert len(train) == 16
    assert not set(train) & set(val)
    assert not set(val) & set(test)
    assert len(val) + len(test) == 4 + 7


def test_test_split_ratio(defect_folder: Path) -> None:
    dm = Folder(defect_folder, test_split_ratio=0.5, val_split="same_as_test")
    dm.setup()
    assert len(dm.train_data) == 10
    assert len(dm.test_data) == 10
    assert dm.summaries[0].source == "'good/' (50 % of normal)"


def test_val_split_from_test_is_stratified(defect_folder: Path) -> None:
    dm = Folder(defect_folder, abnormal_dirs=["crack", "hole"], val_split_ratio=0.5)
    dm.setup()
    val_sources = sorted({s.source for s in dm.val_data.samples})
    test_sources = sorted({s.source for s in dm.test_data.samples})
    assert val_sources == test_sources == ["'crack/'", "'good/'", "'hole/'"]
    # Per-folder halves: 2 of 4 normal, 2 of 4 crack, 2 of 3 hole (1.5 rounds to 2): 6 of 11.
    assert dm.summaries[1].source.endswith(": 55 % of test, stratified by folder")


def test_val_split_same_as_test(defect_folder: Path) -> None:
    dm = Folder(defect_folder, abnormal_dirs="crack", val_split="same_as_test")
    dm.setup()
    assert dm.val_data is dm.test_data
    assert len(dm.test_data) == 4 + 4
    assert "optimistic" in dm.summaries[1].source


def test_val_split_from_train(defect_folder: Path) -> None:
    dm = Folder(defect_folder, abnormal_dirs="crack", val_split="from_train", val_split_ratio=0.25)
    dm.setup()
    assert dm.val_split is ValSplitMode.FROM_TRAIN
    assert len(dm.train_data) == 12
    assert len(dm.val_data) == 4
    assert len(dm.test_data) == 8
    assert dm.summaries[1].abnormal == 0
    assert "quantile" in dm.summaries[1].source
    assert not set(_paths(dm.train_data)) & set(_paths(dm.val_data))


def test_normal_test_dir(defect_folder: Path, write_image) -> None:
    for index in range(5):
        write_image(defect_folder / "good_test" / f"t{index}.png")
    dm = Folder(defect_folder, abnormal_dirs="crack", normal_test_dir="good_test")
    dm.setup()
    assert len(dm.train_data) == 20
    assert dm.summaries[0].source == "'good/' (all)"
    test_normals = [s for s in (*dm.val_data.samples, *dm.test_data.samples) if s.label == 0]
    assert sorted(s.image_path.name for s in test_normals) == [f"t{i}.png" for i in range(5)]


def test_setup_is_idempotent(defect_folder: Path) -> None:
    dm = Folder(defect_folder, abnormal_dirs="crack")
    dm.setup("fit")
    train, summaries = dm.train_data, dm.summaries
    dm.setup("test")
    assert dm.train_data is train
    assert dm.summaries is summaries


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_split_ratio": 0.0}, "test_split_ratio"),
        ({"test_split_ratio": 1.0}, "test_split_ratio"),
        ({"val_split_ratio": 1.5}, "val_split_ratio"),
        ({"val_split_ratio": True}, "val_split_ratio"),
        ({"val_split": "from_tset"}, "did you mean 'from_test'"),
        ({"val_split": "synthetic"}, "choose one of from_test, same_as_test, from_train"),
        ({"abnormal_dirs": 3}, "abnormal_dirs"),
        ({"abnormal_dirs": ["crack", "./crack/"]}, "both data.abnormal_dirs"),
        ({"normal_dir": ""}, "normal_dir"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_options_raise_config_error(defect_folder: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Folder(defect_folder, **kwargs)


def test_normal_images_at_the_root_exclude_other_folders(tmp_path: Path, write_image) -> None:
    root = tmp_path / "flat"
    for index in range(10):
        write_image(root / f"n{index}.png")
    write_image(root / "defects" / "d0.png")
    write_image(root / "defects" / "d1.png")
    write_image(root / "masks" / "d0_mask.png", mask=True)
    write_image(root / "masks" / "d1_mask.png", mask=True)
    dm = Folder(root, normal_dir=".", abnormal_dirs="defects", mask_dir="masks")
    dm.setup()
    samples = [*dm.train_data.samples, *dm.val_data.samples, *dm.test_data.samples]
    normal = sorted(s.image_path.name for s in samples if s.label == 0)
    assert normal == [f"n{i}.png" for i in range(10)]
    assert sum(s.label for s in samples) == 2
    assert dm.summaries[0].source == "'./' (80 % of normal)"
