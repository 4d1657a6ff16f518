"""How PatchCore's fitting scales with the training set: time, coreset time, peak memory.

Fits PatchCore on 100, 400 and 1600 training images of one MVTec-format category (the good
training images repeated when the category has fewer) in ``approximate`` and ``exact``
coreset mode, each fit in its own child process so that its peak memory (max RSS) is its own.
Prints a markdown table and the growth factor of each figure between successive sizes. Then
fits both modes on the whole training set and scores the whole test set: image and pixel
AUROC of exact against approximate selection.

Exact selection costs time ``ratio * N^2`` in the number N of patches; runs above
``--skip-exact-above`` images are not made but estimated from the largest exact run made.

    python benchmarks/patchcore_scaling.py                        # MTD magnetic tiles
    python benchmarks/patchcore_scaling.py --sizes 100 400 --skip-exact-above 400 --no-accuracy
    python benchmarks/patchcore_scaling.py --model-option coreset_threads=2

Timings depend on what else runs on the machine; coreset selection is memory bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _memory import peak_rss_mib, rss_mib

DEFAULT_CATEGORY = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "mtd" / "magnetic_tile"
)
MODES = ("approximate", "exact")
DEFAULT_MODEL = "anomaly_models_memory.patchcore:Patchcore"


# --- child process: one fit ----------------------------------------------------------------


def _load(path: Path, size: int) -> Any:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from anomaly.io import read_image

    array = torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1).float() / 255.0
    return F.interpolate(
        array[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0]


def _load_mask(path: Path, size: int) -> Any:
    import torch
    import torch.nn.functional as F

    from anomaly.io import read_mask

    mask = torch.from_numpy(read_mask(path)).float()[None, None]
    return F.interpolate(mask, size=(size, size), mode="nearest")[0, 0].bool()


def _batches(paths: Sequence[Path], size: int, batch_size: int) -> Iterator[Any]:
    import torch

    for start in range(0, len(paths), batch_size):
        yield torch.stack([_load(path, size) for path in paths[start : start + batch_size]])


def _build_model(args: argparse.Namespace, mode: str) -> Any:
    import importlib

    module_name, _, class_name = args.model_class.partition(":")
    model_class = getattr(importlib.import_module(module_name), class_name)
    options: dict[str, Any] = {
        "backbone": args.backbone,
        "coreset_ratio": args.ratio,
        **dict(args.model_option),
    }
    if args.model_class == DEFAULT_MODEL:
        options["coreset_mode"] = mode
    return model_class(**options).eval()


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Fit (and optionally test) one model in this process; return its figures."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    category = Path(args.category).resolve()
    good = sorted((category / "train" / "good").iterdir())
    count = args.images or len(good)
    train = list(itertools.islice(itertools.cycle(good), count))
    model = _build_model(args, args.mode)
    rss_before = rss_mib()
    collect_seconds = 0.0
    for images in _batches(train, args.image_size, args.batch_size):
        start = time.perf_counter()
        model.collect(images)
        collect_seconds += time.perf_counter() - start
    start = time.perf_counter()
    model.fit_end()
    fit_seconds = collect_seconds + time.perf_counter() - start
    # Approximate mode reduces partitions while embeddings arrive: the model keeps the total.
    coreset_seconds = getattr(model, "coreset_seconds", time.perf_counter() - start)
    embed_seconds = fit_seconds - coreset_seconds
    bank = model.model.memory_bank
    result: dict[str, object] = {
        "mode": args.mode,
        "images": count,
        "patches": None,
        "bank_rows": int(bank.shape[0]),
        "fit_s": round(fit_seconds, 2),
        "embed_s": round(embed_seconds, 2),
        "coreset_s": round(coreset_seconds, 2),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "fit_mib": round(peak_rss_mib() - rss_before, 1),
        "threads": torch.get_num_threads(),
    }
    with torch.inference_mode():
        grid = model.model.embed(torch.zeros(1, 3, args.image_size, args.image_size)).shape
    result["patches"] = count * int(grid[-1] * grid[-2])
    if args.evaluate:
        result.update(_evaluate(model, category, args))
    return result


def _evaluate(model: Any, category: Path, args: argparse.Namespace) -> dict[str, object]:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    test = sorted(path for path in (category / "test").glob("*/*") if path.is_file())
    labels = np.array([int(path.parent.name != "good") for path in test])
    scores, pixel_scores, pixel_labels = [], [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(test), args.batch_size):
            paths = test[first : first + args.batch_size]
            images = torch.stack([_load(path, args.image_size) for path in paths])
            score, anomaly_map = model(images)
            scores.append(score.numpy())
            for path, one_map in zip(paths, anomaly_map, strict=True):
                if path.parent.name == "good":
                    mask = torch.zeros(args.image_size, args.image_size, dtype=torch.bool)
                else:
                    name = f"{path.stem}_mask.png"
                    mask = _load_mask(
                        category / "ground_truth" / path.parent.name / name, args.image_size
                    )
                pixel_scores.append(one_map.flatten().numpy())
                pixel_labels.append(mask.flatten().numpy())
    return {
        "test_images": len(test),
        "image_auroc": round(float(roc_auc_score(labels, np.concatenate(scores))), 4),
        "pixel_auroc": round(
            float(roc_auc_score(np.concatenate(pixel_labels), np.concatenate(pixel_scores))), 4
        ),
        "test_s": round(time.perf_counter() - start, 1),
    }


# --- parent process --------------------------------------------------------------------------


def _child(
    args: argparse.Namespace, mode: str, images: int | None, evaluate: bool
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--mode",
        mode,
        "--category",
        str(args.category),
        "--image-size",
        str(args.image_size),
        "--backbone",
        args.backbone,
        "--ratio",
        str(args.ratio),
        "--batch-size",
        str(args.batch_size),
        "--model-class",
        args.model_class,
    ]
    if images is not None:
        command += ["--images", str(images)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    for key, value in args.model_option:
        command += ["--model-option", f"{key}={json.dumps(value)}"]
    if evaluate:
        command.append("--evaluate")
    print(f"running {mode} on {images or 'all'} images ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _growth(rows: list[dict[str, Any]], key: str) -> str:
    values = [row[key] for row in rows]
    factors = [
        f"x{later / earlier:.2f}"
        if isinstance(earlier, int | float) and isinstance(later, int | float) and earlier
        else "n/a"
        for earlier, later in itertools.pairwise(values)
    ]
    return ", ".join(factors)


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| mode | images | patches | bank rows | fit s | embed s | coreset s | "
        "RSS before fit MiB | peak RSS MiB | fit MiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        mark = " (estimate)" if row.get("estimated") else ""
        lines.append(
            f"| {row['mode']}{mark} | {row['images']} | {row['patches']} | {row['bank_rows']} "
            f"| {row['fit_s']} | {row['embed_s']} | {row['coreset_s']} "
            f"| {row.get('rss_before_mib', '')} | {row.get('peak_rss_mib', '')} "
            f"| {row.get('fit_mib', '')} |"
        )
    return "\n".join(lines)


def _estimate_exact(made: dict[str, Any], approximate: dict[str, Any]) -> dict[str, Any]:
    """Exact coreset time grows as bank rows x patches; embedding as in approximate mode."""
    scale = (approximate["bank_rows"] * approximate["patches"]) / (
        made["bank_rows"] * made["patches"]
    )
    coreset = round(made["coreset_s"] * scale, 1)
    return {
        **approximate,
        "mode": "exact",
        "estimated": True,
        "coreset_s": coreset,
        "fit_s": round(approximate["embed_s"] + coreset, 1),
        "rss_before_mib": "",
        "peak_rss_mib": "",
        "fit_mib": "",
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", type=Path, default=DEFAULT_CATEGORY)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset_ratio")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--skip-exact-above",
        type=int,
        default=None,
        metavar="N",
        help="estimate exact mode above N images instead of running it",
    )
    parser.add_argument(
        "--no-accuracy", action="store_true", help="skip exact vs approximate AUROC"
    )
    parser.add_argument(
        "--model-option",
        action="append",
        default=[],
        type=lambda item: (item.partition("=")[0], json.loads(item.partition("=")[2])),
        metavar="KEY=JSON",
        help="extra Patchcore argument (repeatable)",
    )
    parser.add_argument(
        "--model-class",
        default=DEFAULT_MODEL,
        help="module:Class of the model to measure (another implementation to compare)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    # Child-process arguments.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="approximate", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    if not (args.category / "train" / "good").is_dir():
        parser.error(f"no MVTec-format category at {args.category} (train/good missing)")

    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        made: dict[str, Any] | None = None
        for size in args.sizes:
            if mode == "exact" and args.skip_exact_above and size > args.skip_exact_above:
                approximate = next(
                    (r for r in rows if r["mode"] == "approximate" and r["images"] == size), None
                )
                if made is not None and approximate is not None:
                    rows.append(_estimate_exact(made, approximate))
                continue
            made = _child(args, mode, size, evaluate=False)
            rows.append(made)
    print(_table(rows))
    print()
    for mode in args.modes:
        measured = [row for row in rows if row["mode"] == mode]
        if len(measured) > 1:
            print(
                f"- {mode}: patches {_growth(measured, 'patches')}; fit time "
                f"{_growth(measured, 'fit_s')}; coreset time {_growth(measured, 'coreset_s')}; "
                f"fit memory {_growth(measured, 'fit_mib')}"
            )
    accuracy: list[dict[str, Any]] = []
    if not args.no_accuracy:
        accuracy = [_child(args, mode, None, evaluate=True) for mode in args.modes]
        print()
        print("| mode | train images | bank rows | fit s | coreset s | image AUROC | pixel AUROC |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in accuracy:
            print(
                f"| {row['mode']} | {row['images']} | {row['bank_rows']} | {row['fit_s']} | "
                f"{row['coreset_s']} | {row['image_auroc']} | {row['pixel_auroc']} |"
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"scaling": rows, "accuracy": accuracy}, indent=2))


if __name__ == "__main__":
    main()
