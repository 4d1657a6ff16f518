from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import anomaly
from anomaly.io import image_to_tensor, mask_to_tensor
from anomaly.testing import SYNTHETIC_DEFECTS, make_synthetic_mvtec


def test_plugin_registers_the_datamodules() -> None:
    pm = anomaly.get_plugin_manager()
    for name, cls in (("folder", "Folder"), ("mvtec_ad", "MvtecAd"), ("demo", "Demo")):
        spec = pm.datamodule(name)
        assert spec.provider == "anomaly-data"
        target = spec.load()
        assert isinstance(target, type)
        assert target.__name__ == cls
        assert issubclass(target, anomaly.AnomalyDataModule)


def test_importing_the_plugin_module_is_light() -> None:
    code = (
        "import sys, anomaly_data, anomaly_data.plugin as p; p.anomaly_register_datamodules(); "
        "heavy = [m for m in ('torch', 'lightning', 'skimage') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_lazy_exports() -> None:
    import anomaly_data

    assert anomaly_data.Folder.__module__ == "anomaly_data.datamodules.folder"
    assert set(anomaly_data.__all__) <= set(dir(anomaly_data))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = anomaly_data.Nope


def test_testing_helper_works_without_pytest(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from pathlib import Path\n"
        "import anomaly.testing as t\n"
        f"print(t.make_synthetic_mvtec(Path({str(tmp_path)!r})).name, "
        "hasattr(t, 'synthetic_mvtec'), t.__all__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[:2] == ["widget", "False"]


def test_make_synthetic_mvtec_is_seeded(tmp_path: Path) -> None:
    def digest(folder: Path) -> dict[str, str]:
        return {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))
        }

    first = make_synthetic_mvtec(tmp_path / "a", n_defect_test=5)
    second = make_synthetic_mvtec(tmp_path / "b", n_defect_test=5)
    other = make_synthetic_mvtec(tmp_path / "c", n_defect_test=5, seed=1)
    assert digest(first) == digest(second) != digest(other)
    assert len(list((first / "test" / SYNTHETIC_DEFECTS[0]).glob("*.png"))) == 3
    assert len(list((first / "test" / SYNTHETIC_DEFECTS[1]).glob("*.png"))) == 2
    assert len(list((first / "ground_truth").rglob("*_mask.png"))) == 5


def test_synthetic_mvtec_fixture(synthetic_mvtec: Path) -> None:
    widget = synthetic_mvtec / "widget"
    assert len(list((widget / "train" / "good").glob("*.png"))) == 16
    assert len(list((widget / "test" / "good").glob("*.png"))) == 6


def test_resize_keeps_ranges_and_types() -> None:
    image = np.zeros((100, 80, 3), dtype=np.uint8)
    image[::2] = 255
    resized = image_to_tensor(image, (50, 40))
    assert resized.shape == (3, 50, 40)
    assert resized.dtype == torch.float32
    # Antialiasing averages the one-pixel stripes instead of picking every other row
    # (the border rows see a clipped kernel).
    inner = resized[:, 1:-1]
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=0.01)
    mask = np.zeros((100, 80), dtype=bool)
    mask[10:30, 20:40] = True
    small = mask_to_tensor(mask, (50, 40))
    assert small.dtype == torch.bool
    assert int(small.sum()) == 10 * 10
