"""Train and test models on an MVTec-format category; print accuracy, speed and memory.

Each model runs in its own child process so that peak memory (max RSS) is measured per model.
The first model is the baseline of the ratio columns.

    python benchmarks/benchmark.py --root ../shared/datasets/mtd --category magnetic_tile \
        --model patchcore --model padim
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1")


def run_one(
    args: argparse.Namespace, model_name: str, model_args: dict[str, object]
) -> dict[str, object]:
    """Fit and test one model in this process; return its figures."""
    import torch

    from anomaly import Engine, get_plugin_manager

    if args.threads:
        torch.set_num_threads(args.threads)
    pm = get_plugin_manager()
    data = pm.datamodule("mvtec_ad").load()(
        root=args.root,
        category=args.category,
        image_size=args.image_size,
        val_split=args.val_split,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
    )
    model = pm.model(model_name).load()(**model_args)
    engine = Engine(plugin_manager=pm, accelerator="cpu", devices=1)
    start = time.perf_counter()
    data.setup()
    setup_seconds = time.perf_counter() - start
    fitted = engine.fit(model, data)
    result = engine.test(model, data, metrics=list(METRICS), visualizer=None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": model_name,
        "args": model_args,
        **{name: result.metrics[name] for name in METRICS},
        "fit_seconds": fitted.seconds,
        "setup_seconds": setup_seconds,
        "train_images": fitted.train_images,
        "test_images": result.images,
        "test_images_per_second": result.images_per_second,
        "peak_rss_mib": peak_kib / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="MVTec-format root folder")
    parser.add_argument("--category", required=True)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name, optionally with JSON arguments: "
        "patchcore or 'patchcore={\"coreset_ratio\": 0.01}'",
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--val-split",
        default="same_as_test",
        help="validation split mode; same_as_test keeps every test image in the metrics",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        name, model_args = json.loads(args.worker)
        print(json.dumps(run_one(args, name, model_args)))
        return

    rows = []
    for item in args.model or ["patchcore", "padim"]:
        name, _, raw = item.partition("=")
        model_args = json.loads(raw) if raw else {}
        command = [sys.executable, __file__, "--worker", json.dumps([name, model_args])]
        command += ["--root", args.root, "--category", args.category]
        command += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
        command += ["--val-split", args.val_split, "--threads", str(args.threads)]
        Console(stderr=True).print(f"[bold]running {item}[/bold] ...")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            Console(stderr=True).print(done.stderr[-3000:])
            raise SystemExit(done.returncode)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    table = Table(
        title=f"{args.category} at {args.image_size} px "
        f"({rows[0]['train_images']} train, {rows[0]['test_images']} test images, "
        f"val {args.val_split})"
    )
    columns = ["model", *METRICS, "fit s", "test img/s", "peak RSS MiB"]
    if len(rows) > 1:
        columns += ["fit ratio", "img/s ratio", "RSS ratio"]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    base = rows[0]
    for row in rows:
        label = str(row["model"]) + (f" {row['args']}" if row["args"] else "")
        cells = [label, *(f"{row[name]:.4f}" for name in METRICS)]
        cells += [
            f"{row['fit_seconds']:.1f}",
            f"{row['test_images_per_second']:.1f}",
            f"{row['peak_rss_mib']:.0f}",
        ]
        if len(rows) > 1:
            cells += [
                f"{row['fit_seconds'] / base['fit_seconds']:.2f}",
                f"{row['test_images_per_second'] / base['test_images_per_second']:.2f}",
                f"{row['peak_rss_mib'] / base['peak_rss_mib']:.2f}",
            ]
        table.add_row(*cells)
    Console().print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
