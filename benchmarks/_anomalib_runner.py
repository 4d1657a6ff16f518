"""Fit and score one Anomalib model on an MVTec-layout folder; write raw predictions to ``.npz``.

Run by ``compare_anomalib.py`` with the Python of a throwaway virtual environment that has
Anomalib installed; never imported by the project. One argument: a JSON file with the job::

    {"model": "patchcore" | "padim", "category_dir": ..., "mask_dir": ..., "image_size": 256,
     "batch_size": 16, "threads": 0, "weights": ".../efficientnet_lite0.safetensors",
     "backbone": "efficientnet_lite0", "layers": [...], "options": {...},
     "predictions": "out.npz", "result": "out.json", "work_dir": "..."}

Backbone weights: Anomalib's ``TimmFeatureExtractor`` calls ``timm.create_model(backbone,
pretrained=True, ...)``, which would download. This process wraps ``timm.create_model`` (here
only) so that, for the configured backbone, it also passes ``pretrained_cfg_overlay={"file":
weights}``: timm then loads that local file, the very state dict our side uses. The runner
checks afterwards that every tensor of the built extractor equals the file's tensor of the
same name, and reports a fingerprint of a few of them.

Data: Anomalib's ``Folder`` datamodule reads the same files as our side (symlinks). Every image
is resized on its own to ``image_size`` squared (torchvision, bilinear, antialiased) by the
datamodule's ``augmentations``, so batches of differently sized images are never resized to a
common size first; the model's pre-processor then only normalizes (its resize to the same size
changes nothing). No centre crop. Post-processing, evaluator and visualizer are off: the
predictions written are Anomalib's raw ``pred_score`` and ``anomaly_map``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _memory import peak_rss_mib, rss_mib

# No hub access, ever: the weights come from a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FINGERPRINT_KEYS = ("conv_stem.weight", "blocks.1.0.conv_pw.weight", "blocks.4.2.conv_pwl.weight")


def patch_timm(backbone: str, weights: str) -> None:
    """Make ``timm.create_model(backbone, pretrained=True)`` load ``weights`` instead of a hub."""
    import timm

    original: Callable[..., Any] = timm.create_model

    @functools.wraps(original)
    def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        if pretrained and model_name == backbone:
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
            overlay["file"] = weights
            kwargs["pretrained_cfg_overlay"] = overlay
        elif pretrained:
            msg = f"backbone {model_name!r} has no local weights here; only {backbone!r} has"
            raise RuntimeError(msg)
        return original(model_name, pretrained=pretrained, **kwargs)

    timm.create_model = create_model  # type: ignore[assignment]  # same call, narrower signature


def check_weights(extractor: Any, weights: str) -> dict[str, Any]:
    """Compare the built feature extractor's tensors with the weight file, name by name."""
    import torch
    from safetensors.torch import load_file

    reference = load_file(weights)
    state = extractor.state_dict()
    matched = [key for key in state if key in reference]
    different = [key for key in matched if not torch.equal(state[key].cpu(), reference[key])]
    if not matched or different or len(matched) < len(state):
        msg = (
            f"Anomalib's backbone does not hold the weights of {weights!r}: {len(matched)} of "
            f"{len(state)} tensors matched by name, {len(different)} differ "
            f"(first: {different[:3]!r})"
        )
        raise RuntimeError(msg)
    return {
        "tensors_checked": len(matched),
        "fingerprint": {
            key: float(state[key].double().sum()) for key in FINGERPRINT_KEYS if key in state
        },
    }


def build_model(job: dict[str, Any]) -> Any:
    """Build Anomalib's model with our image size, no crop and no post-processing."""
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    size = (job["image_size"], job["image_size"])
    pre_processor = PreProcessor(
        transform=Compose(
            [Resize(size, antialias=True), Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
        )
    )
    common: dict[str, Any] = {
        "backbone": job["backbone"],
        "layers": list(job["layers"]),
        "pre_trained": True,
        "pre_processor": pre_processor,
        "post_processor": False,
        "evaluator": False,
        "visualizer": False,
    }
    if job["model"] == "patchcore":
        return Patchcore(**common, **job["options"])
    if job["model"] == "padim":
        return Padim(**common, **job["options"])
    msg = f"unknown model {job['model']!r}; use patchcore or padim"
    raise ValueError(msg)


def build_datamodule(job: dict[str, Any]) -> Any:
    """Anomalib's Folder datamodule over the same files, each resized on its own."""
    from anomalib.data import Folder
    from torchvision.transforms.v2 import Resize

    category = Path(job["category_dir"])
    defects = sorted(
        path.name for path in (category / "test").iterdir() if path.is_dir() and path.name != "good"
    )
    mask_dir = Path(job["mask_dir"])
    size = (job["image_size"], job["image_size"])
    return Folder(
        name=category.name,
        root=category,
        normal_dir="train/good",
        abnormal_dir=[f"test/{defect}" for defect in defects],
        normal_test_dir="test/good",
        mask_dir=[str(mask_dir / defect) for defect in defects],
        train_batch_size=job["batch_size"],
        eval_batch_size=job["batch_size"],
        num_workers=0,
        augmentations=Resize(size, antialias=True),
        test_split_mode="from_dir",
        val_split_mode="same_as_test",
        seed=0,
    )


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    patch_timm(job["backbone"], job["weights"])

    import anomalib
    import lightning.pytorch as pl
    import numpy as np
    import torch
    from anomalib.callbacks.checkpoint import ModelCheckpoint
    from anomalib.engine import Engine

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)

    class Collector(pl.Callback):
        """Keep only what the metrics need: raw scores, raw maps and paths."""

        def __init__(self) -> None:
            self.scores: list[np.ndarray] = []
            self.maps: list[np.ndarray] = []
            self.paths: list[str] = []

        def on_predict_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
        ) -> None:
            score = outputs.pred_score.detach().float().cpu().reshape(-1)
            maps = outputs.anomaly_map.detach().float().cpu()
            self.scores.append(score.numpy())
            self.maps.append(maps.reshape(score.shape[0], *maps.shape[-2:]).numpy())
            self.paths.extend(str(path) for path in outputs.image_path)

    start = time.perf_counter()
    model = build_model(job)
    build_seconds = time.perf_counter() - start
    weights = check_weights(model.model.feature_extractor.feature_extractor, job["weights"])
    extractor = model.model.feature_extractor.feature_extractor
    reductions = [int(value) for value in extractor.feature_info.reduction()]

    bank: dict[str, float] = {}
    fit_function = model.fit

    @functools.wraps(fit_function)
    def timed_fit() -> None:
        bank["start"] = time.perf_counter()
        bank["cpu_start"] = time.process_time()
        fit_function()
        bank["end"] = time.perf_counter()
        bank["cpu_end"] = time.process_time()

    # MemoryBankMixin calls self.fit() at the end of the training epoch: time it there.
    model.fit = timed_fit

    datamodule = build_datamodule(job)
    collector = Collector()
    work_dir = Path(job["work_dir"])
    engine = Engine(
        # A checkpoint callback that saves nothing, so that Anomalib adds none of its own.
        callbacks=[ModelCheckpoint(dirpath=work_dir / "checkpoints", save_top_k=0), collector],
        default_root_dir=work_dir,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    rss_before_fit = rss_mib()
    fit_start = time.perf_counter()
    fit_cpu_start = time.process_time()
    engine.fit(model=model, datamodule=datamodule)
    fit_total = time.perf_counter() - fit_start
    if "end" not in bank:
        msg = "Anomalib's model was never fitted (its fit() did not run during Engine.fit)"
        raise RuntimeError(msg)

    test_start = time.perf_counter()
    test_cpu_start = time.process_time()
    engine.predict(model=model, datamodule=datamodule, return_predictions=False)
    test_seconds = time.perf_counter() - test_start
    test_cpu_seconds = time.process_time() - test_cpu_start

    scores = np.concatenate(collector.scores)
    np.savez(
        job["predictions"],
        scores=scores,
        maps=np.concatenate(collector.maps),
        paths=np.array(collector.paths),
    )
    train_images = len(datamodule.train_data)
    bank_size = None
    if job["model"] == "patchcore":
        bank_size = int(model.model.memory_bank.shape[0])
    result = {
        "library": "anomalib",
        "rss_before_fit_mib": rss_before_fit,
        "peak_rss_mib": peak_rss_mib(),
        "version": anomalib.__version__,
        "torch": torch.__version__,
        "model": job["model"],
        "layers": list(job["layers"]),
        "reductions": reductions,
        "options": job["options"],
        "build_seconds": build_seconds,
        "fit_seconds": bank["end"] - fit_start,
        "bank_seconds": bank["end"] - bank["start"],
        "fit_cpu_seconds": bank["cpu_end"] - fit_cpu_start,
        "bank_cpu_seconds": bank["cpu_end"] - bank["cpu_start"],
        "engine_fit_seconds": fit_total,
        "train_images": train_images,
        "memory_bank": bank_size,
        "test_images": int(scores.shape[0]),
        "test_seconds": test_seconds,
        "test_cpu_seconds": test_cpu_seconds,
        "weights": weights,
        "threads": torch.get_num_threads(),
    }
    Path(job["result"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
