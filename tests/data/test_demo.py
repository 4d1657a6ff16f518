from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from anomaly import ConfigError, DataError
from anomaly.io import read_image, read_mask
from anomaly_data import Demo
from anomaly_data.datasets import demo as demo_module
from anomaly_data.datasets.demo import (
    DEMO_DEFECTS,
    DEMO_VERSION,
    cache_dir,
    ensure_demo_dataset,
    generate_demo_category,
)


def _digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def grass(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "grass"
    generate_demo_category("grass", folder)
    return folder


def test_demo_layout_and_masks(grass: Path) -> None:
    def count(relative: str) -> int:
        return len(list((grass / relative).glob("*.png")))

    assert count("train/good") == 60
    assert count("test/good") == 20
    for defect in DEMO_DEFECTS:
        assert count(f"test/{defect}") == 10
        for image_path in sorted((grass / "test" / defect).glob("*.png")):
            mask = read_mask(grass / "ground_truth" / defect / f"{image_path.stem}_mask.png")
            image = read_image(image_path)
            assert image.shape == (256, 256, 3)
            assert mask.shape == (256, 256)
            # Visible but local: a defect covers some pixels, never most of the image.
            assert 20 < int(mask.sum()) < 256 * 256 // 4


def test_demo_defects_change_the_pixels_they_mark(grass: Path) -> None:
    good = np.stack([read_image(p) for p in sorted((grass / "test/good").glob("*.png"))])
    normal_std = float(good.astype(np.float32).std())
    for defect in DEMO_DEFECTS:
        for image_path in sorted((grass / "test" / defect).glob("*.png"))[:3]:
            image = read_image(image_path).astype(np.float32)
            mask = read_mask(grass / "ground_truth" / defect / f"{image_path.stem}_mask.png")
            inside = image[mask].mean(axis=0)
            outside = image[~mask].mean(axis=0)
            # The defect region differs in colour from its surroundings by a visible margin.
            assert float(np.abs(inside - outside).max()) > 0.2 * normal_std, defect


def test_demo_generation_is_deterministic(grass: Path, tmp_path: Path) -> None:
    again = tmp_path / "grass"
    generate_demo_category("grass", again)
    assert _digests(again) == _digests(grass)


def test_demo_datamodule_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "cache"))
    dm = Demo(image_size=64)
    dm.setup()
    category_dir = tmp_path / "cache" / "demo" / DEMO_VERSION / "brick"
    assert dm.category_dir == category_dir
    assert (category_dir / "ground_truth" / "scratch" / "000_mask.png").is_file()
    train, val, test = dm.summaries
    assert train.images == 60
    assert val.images + test.images == 50
    assert val.abnormal + test.abnormal == 30
    assert val.masks + test.masks == 30
    item = dm.test_data[len(dm.test_data) - 1]
    assert item["image"].shape == (3, 64, 64)
    assert item["gt_label"] == 1
    assert bool(item["gt_mask"].any())
    # A second datamodule reuses the cached files instead of generating them again.
    stamp = (category_dir / "train" / "good" / "000.png").stat().st_mtime_ns
    monkeypatch.setattr(demo_module, "generate_demo_category", _must_not_generate)
    Demo(image_size=64).setup()
    assert (category_dir / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    # Nothing but the category is left in the cache: no staging folders.
    assert [p.name for p in category_dir.parent.iterdir()] == ["brick"]


def _must_not_generate(category: str, destination: Path) -> None:
    msg = f"generated {category} again into {destination}"
    raise AssertionError(msg)


def test_demo_root_overrides_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "generate_demo_category", _fake_generate)
    Demo("gravel", root=str(tmp_path / "mine"), val_split="same_as_test").setup()
    assert (tmp_path / "mine" / "demo" / DEMO_VERSION / "gravel" / "train" / "good").is_dir()


def _fake_generate(category: str, destination: Path) -> None:
    """A tiny stand-in for the generator, in the same layout."""
    from anomaly.testing import make_synthetic_mvtec

    made = make_synthetic_mvtec(destination.parent, category=destination.name, n_train=4)
    assert made == destination


def test_concurrent_generation_keeps_the_first_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "demo" / DEMO_VERSION / "grass"

    def racing(category: str, destination: Path) -> None:
        # Another process finishes first while this one is still generating.
        _fake_generate(category, target)
        (target / "winner").write_text("first")
        _fake_generate(category, destination)

    monkeypatch.setattr(demo_module, "generate_demo_category", racing)
    assert ensure_demo_dataset("grass", tmp_path) == target
    assert (target / "winner").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["grass"]


def test_unwritable_cache_is_a_data_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="ANOMALY_CACHE_DIR"):
        ensure_demo_dataset("brick", blocker)


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("ANOMALY_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "anomaly"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "anomaly"


def test_unknown_demo_category() -> None:
    with pytest.raises(ConfigError, match="choose one of brick, grass, gravel"):
        Demo("marble")
    with pytest.raises(ConfigError, match="unknown demo category"):
        ensure_demo_dataset("marble")
