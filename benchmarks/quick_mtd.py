"""Quick accuracy and speed check of PatchCore and PaDiM on MTD (magnetic tiles), no Engine.

Fits each model on the 761 good training images, scores the 583 test images and prints image
AUROC, pixel AUROC, fit seconds and test images per second. Images are resized to a square
(bilinear, antialiased), masks with nearest neighbour.

    python benchmarks/quick_mtd.py                          # both models, defaults
    python benchmarks/quick_mtd.py --model patchcore --set strides=[8,16] --set coreset_ratio=0.01
    python benchmarks/quick_mtd.py --limit-test 200         # stratified subset, for exploring
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score

from anomaly.io import read_image, read_mask
from anomaly_models_memory import Padim, Patchcore

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "mtd"
MODELS: dict[str, type[Patchcore] | type[Padim]] = {"patchcore": Patchcore, "padim": Padim}


def load_image(path: Path, size: int) -> torch.Tensor:
    array = torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1).float() / 255.0
    resized = F.interpolate(
        array[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0]


def load_mask(path: Path, size: int) -> torch.Tensor:
    mask = torch.from_numpy(read_mask(path)).float()[None, None]
    return F.interpolate(mask, size=(size, size), mode="nearest")[0, 0].bool()


@dataclass(frozen=True)
class Split:
    train: list[Path]
    test: list[Path]
    labels: torch.Tensor  # (N,) 0 good, 1 defective
    masks: torch.Tensor  # (N, size, size) bool


def load_split(root: Path, size: int, limit_test: int | None, seed: int) -> Split:
    category = root / "magnetic_tile"
    train = sorted((category / "train" / "good").glob("*.jpg"))
    test = sorted((category / "test").glob("*/*.jpg"))
    if limit_test is not None and limit_test < len(test):
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(len(test), generator=generator)[:limit_test].sort().values
        test = [test[int(i)] for i in picked]
    labels = torch.tensor([int(path.parent.name != "good") for path in test])
    masks = torch.stack(
        [
            torch.zeros(size, size, dtype=torch.bool)
            if path.parent.name == "good"
            else load_mask(
                category / "ground_truth" / path.parent.name / f"{path.stem}_mask.png", size
            )
            for path in test
        ]
    )
    return Split(train, test, labels, masks)


def load_batches(paths: list[Path], size: int, batch_size: int) -> list[torch.Tensor]:
    return [
        torch.stack([load_image(path, size) for path in paths[i : i + batch_size]])
        for i in range(0, len(paths), batch_size)
    ]


def evaluate(
    name: str, options: dict[str, Any], data: Split, size: int, batch_size: int
) -> dict[str, object]:
    torch.manual_seed(0)
    model = MODELS[name](**options)
    model.eval()
    train_images = load_batches(data.train, size, batch_size)
    test_images = load_batches(data.test, size, batch_size)
    test, labels, masks = data.test, data.labels, data.masks

    start = time.perf_counter()
    for images in train_images:
        model.collect(images)
    collected = time.perf_counter()
    model.fit_end()
    fitted = time.perf_counter()

    scores, maps = [], []
    with torch.inference_mode():
        for images in test_images:
            score, anomaly_map = model(images)
            scores.append(score)
            maps.append(anomaly_map)
    tested = time.perf_counter()
    score = torch.cat(scores).numpy()
    anomaly_map = torch.cat(maps)
    image_auroc = roc_auc_score(labels.numpy(), score)
    pixel_auroc = roc_auc_score(masks.flatten().numpy(), anomaly_map.flatten().numpy())
    per_defect = {}
    for defect in sorted({p.parent.name for p in test} - {"good"}):
        keep = np.array([p.parent.name in ("good", defect) for p in test])
        per_defect[defect] = round(float(roc_auc_score(labels.numpy()[keep], score[keep])), 4)
    return {
        "model": name,
        "options": options,
        "image_size": size,
        "train_images": len(data.train),
        "test_images": len(test),
        "image_auroc": round(float(image_auroc), 4),
        "pixel_auroc": round(float(pixel_auroc), 4),
        "image_auroc_per_defect": per_defect,
        "embed_s": round(collected - start, 1),
        "fit_s": round(fitted - start, 1),
        "coreset_or_stats_s": round(fitted - collected, 1),
        "test_images_per_s": round(len(test) / (tested - fitted), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MTD folder")
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--size", type=int, default=256, help="square image side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit-test", type=int, default=None, help="random test subset")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, value parsed as YAML (repeatable)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    data = load_split(args.root.resolve(), args.size, args.limit_test, seed=0)
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        result = evaluate(name, options, data, args.size, args.batch_size)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
