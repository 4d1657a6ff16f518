"""Helpers shared by the exporter tests: fitted models, images, and running an export.

``tests`` is no package, so test modules load this file with ``load_helpers()`` (below, copied
in each of them as two lines) instead of importing it by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly import Batch, Engine
from anomaly.io import read_image
from anomaly.testing import make_synthetic_mvtec

SIZE = 64
OUTPUTS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


def make_data(root: Path) -> Path:
    """Write a synthetic MVTec-layout category (64 px) with 40 normal and 30 defective images."""
    make_synthetic_mvtec(root, size=SIZE, n_train=16, n_good_test=24, n_defect_test=30)
    return root


def datamodule(root: Path) -> Any:
    """Return the MVTec AD datamodule over ``make_data``'s folder, at 64 px."""
    from anomaly_data.datamodules.mvtec_ad import MvtecAd

    return MvtecAd(
        root=root,
        category="widget",
        image_size=SIZE,
        train_batch_size=8,
        eval_batch_size=8,
        seed=0,
    )


# Only the stride-4 and stride-8 levels: the backbone is cut after them, which halves the
# graph every exporter traces (export time grows with the number of operations).
SHALLOW: dict[str, dict[str, Any]] = {
    "padim": {"strides": [4, 8], "n_features": 48},
    "patchcore": {"strides": [8]},
}


def fit(name: str, data: Any, **options: Any) -> Any:
    """Fit a registered model (``padim`` or ``patchcore``) on ``data``."""
    engine = Engine()
    model = engine.plugin_manager.model(name).load()(**options)  # type: ignore[operator]
    engine.fit(model, data)
    return model.eval()


def all_images(root: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Every training and test image as (N, 3, 64, 64) float32, and which are defective."""
    paths = sorted(
        path for path in (root / "widget").rglob("*.png") if "ground_truth" not in path.parts
    )
    images = np.stack([read_image(path) for path in paths]).astype(np.float32) / 255.0
    defective = np.array([path.parent.name != "good" for path in paths])
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), defective


def reference(model: Any, images: torch.Tensor) -> list[np.ndarray]:
    """The model's own normalized predictions for images at its input size."""
    with torch.no_grad():
        batch = model.predict_batch(Batch(image=images))
    return [
        batch.pred_score.numpy(),
        batch.pred_label.numpy().astype(bool),
        batch.anomaly_map.numpy(),
        batch.pred_mask.numpy(),
    ]


class Runner:
    """Run an export folder with its own runtime (OpenVINO in float32 arithmetic)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        fmt = self.metadata["format"]
        if fmt == "torch":
            self._module = torch.export.load(folder / "model.pt2").module()
        elif fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            # Spinning idle threads would slow the torch reference computed next.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(
                str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
        else:
            import openvino as ov

            self._compiled = ov.Core().compile_model(
                str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
            )
        self.format = fmt

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        """Return the four outputs for (N, 3, H, W) images in [0, 1]."""
        if self.format == "torch":
            with torch.no_grad():
                return [output.numpy() for output in self._module(images)]
        if self.format == "onnx":
            return list(self._session.run(list(OUTPUTS), {"image": images.numpy()}))
        results = self._compiled([images.numpy()])
        return [np.asarray(results[port]) for port in self._compiled.outputs]
