"""Speed of the frozen backbone under each runtime, and PaDiM end to end, eager vs OpenVINO.

Part 1 measures ``FeatureExtractor`` throughput (images/s) of efficientnet_lite0/1/2 features
(strides 4, 8, 16 as PaDiM uses them) at 256 px, batch 1 and 8, for every runtime: a warm-up
(which builds the compiled or converted model; its time is reported as ``setup_s``), then the
median over several timed runs. Part 2 fits PaDiM on a small MTD subset and scores another,
eager vs OpenVINO, and checks that both give the same scores.

Every measurement runs in a fresh child process: OpenVINO's worker threads and torch.compile's
caches would otherwise slow down or speed up whatever is measured after them. Timings depend
on what else the machine runs: the load average is printed with each row.

    python benchmarks/backbone_speed.py                         # everything
    python benchmarks/backbone_speed.py --backbone efficientnet_lite0 --runtime eager \
        --runtime openvino --skip-padim
    python benchmarks/backbone_speed.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "mtd"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
RUNTIMES = ("eager", "channels_last", "compile", "openvino")


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def _threads(threads: int | None, runtime: str) -> int | None:
    """Apply ``threads`` to torch; return what the OpenVINO runtime should use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return threads if runtime == "openvino" else None


def measure_backbone(
    backbone: str,
    runtime: str,
    batch: int,
    size: int,
    repeats: int,
    seconds: float,
    threads: int | None,
) -> dict[str, Any]:
    """Return the images/s of one backbone, runtime and batch size (in this process)."""
    import torch

    from anomaly.backbones import FeatureExtractor

    extractor = FeatureExtractor(
        backbone, (4, 8, 16), runtime=runtime, runtime_threads=_threads(threads, runtime)
    )
    image = torch.rand(batch, 3, size, size)
    start = time.perf_counter()
    extractor(image)  # builds the compiled / converted model
    setup = time.perf_counter() - start
    for _ in range(3):
        extractor(image)
    # Calls per timed run: enough for about `seconds` seconds.
    start = time.perf_counter()
    extractor(image)
    once = time.perf_counter() - start
    calls = max(1, round(seconds / max(once, 1e-6)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            extractor(image)
        rates.append(batch * calls / (time.perf_counter() - start))
    compiled_ok = True
    runner = extractor._runners.get("compile")
    if runner is not None:
        compiled_ok = not runner.failed  # type: ignore[attr-defined]
    return {
        "backbone": backbone,
        "runtime": runtime,
        "batch": batch,
        "images_per_s": statistics.median(rates),
        "spread": (min(rates), max(rates)),
        "setup_s": setup,
        "compiled": compiled_ok,
        "load": _load(),
    }


def measure_padim(
    runtime: str,
    root: str | Path,
    size: int,
    n_train: int,
    n_test: int,
    batch: int,
    threads: int | None,
) -> dict[str, Any]:
    """Fit PaDiM on ``n_train`` good MTD images and score ``n_test`` others (this process)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from anomaly.io import read_image
    from anomaly_models_memory import Padim

    category = Path(root) / "magnetic_tile"
    train = sorted((category / "train" / "good").glob("*.jpg"))[:n_train]
    test = sorted((category / "test").glob("*/*.jpg"))
    picked = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n_test]
    test = [test[int(index)] for index in picked.sort().values]
    labels = np.array([int(path.parent.name != "good") for path in test])

    def batches(paths: list[Path]) -> list[torch.Tensor]:
        images = [
            F.interpolate(
                torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1)[None].float() / 255,
                size=(size, size),
                mode="bilinear",
                antialias=True,
            )[0]
            for path in paths
        ]
        return [torch.stack(images[i : i + batch]) for i in range(0, len(images), batch)]

    train_batches, test_batches = batches(train), batches(test)
    torch.manual_seed(0)
    model = Padim(backbone_runtime=runtime).eval()
    extractor = model.model.feature_extractor
    extractor.runtime_threads = _threads(threads, runtime)  # read when OpenVINO is built
    forward = extractor.forward
    backbone_s = [0.0]

    def timed(image: torch.Tensor) -> list[torch.Tensor]:
        begin = time.perf_counter()
        features = forward(image)
        backbone_s[0] += time.perf_counter() - begin
        return features

    extractor.forward = timed  # type: ignore[method-assign]  # measures the backbone's share
    start = time.perf_counter()
    for images in train_batches:
        model.collect(images)
    model.fit_end()
    fitted = time.perf_counter()
    with torch.inference_mode():
        scores = torch.cat([model(images)[0] for images in test_batches])
    tested = time.perf_counter()
    return {
        "runtime": runtime,
        "train_images": len(train),
        "test_images": len(test),
        "fit_s": fitted - start,
        "test_s": tested - fitted,
        "total_s": tested - start,
        "backbone_s": backbone_s[0],
        "image_auroc": float(roc_auc_score(labels, scores.numpy())),
        "scores": scores.tolist(),
        "load": _load(),
    }


def _child(kind: str, options: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    command = [sys.executable, __file__, "--child", json.dumps({"kind": kind, **options})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {kind} {options}: over {timeout:.0f} s, skipped", file=sys.stderr)
        return None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"  {kind} {options}: failed: {tail[0]}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _run_child(spec: str) -> None:
    options = json.loads(spec)
    kind = options.pop("kind")
    result = measure_backbone(**options) if kind == "backbone" else measure_padim(**options)
    print(json.dumps(result))


def main() -> None:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backbone", action="append", choices=BACKBONES, help="repeatable")
    parser.add_argument("--runtime", action="append", choices=RUNTIMES, help="repeatable")
    parser.add_argument("--batch", action="append", type=int, help="repeatable; default 1, 8")
    parser.add_argument("--size", type=int, default=256, help="square input side")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median counts")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run")
    parser.add_argument("--timeout", type=float, default=900.0, help="per measurement")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch and OpenVINO (default: their own defaults, every core); "
        "1 gives steadier figures on a busy machine, where torch's 2-thread OpenMP stalls",
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MTD folder")
    parser.add_argument("--train", type=int, default=100, help="PaDiM training images")
    parser.add_argument("--test", type=int, default=100, help="PaDiM test images")
    parser.add_argument("--skip-backbones", action="store_true")
    parser.add_argument("--skip-padim", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _run_child(args.child)
        return

    backbones = args.backbone or list(BACKBONES)
    runtimes = args.runtime or list(RUNTIMES)
    batch_sizes = args.batch or [1, 8]
    threads = args.threads or "default (every core)"
    print(f"cpu cores: {os.cpu_count()}, threads: {threads}, load average at start: {_load()}")
    rows: list[dict[str, Any]] = []
    if not args.skip_backbones:
        print(f"\n## Backbone features, {args.size} px, strides 4/8/16 (images/s, median)\n")
        print("| backbone | batch | runtime | images/s | x eager | min-max | setup s | load |")
        print("|---|---|---|---|---|---|---|---|")
        for backbone in backbones:
            for batch in batch_sizes:
                eager_rate: float | None = None
                for runtime in runtimes:
                    options = {
                        "backbone": backbone,
                        "runtime": runtime,
                        "batch": batch,
                        "size": args.size,
                        "repeats": args.repeats,
                        "seconds": args.seconds,
                        "threads": args.threads,
                    }
                    row = _child("backbone", options, args.timeout)
                    if row is None:
                        continue
                    rows.append(row)
                    rate = row["images_per_s"]
                    if runtime == "eager":
                        eager_rate = rate
                    ratio = f"{rate / eager_rate:.2f}" if eager_rate else "-"
                    note = "" if row["compiled"] else " (compile failed: eager)"
                    low, high = row["spread"]
                    print(
                        f"| {backbone} | {batch} | {runtime}{note} | {rate:.1f} | {ratio} | "
                        f"{low:.1f}-{high:.1f} | {row['setup_s']:.1f} | {row['load']} |",
                        flush=True,
                    )
    padim: list[dict[str, Any]] = []
    root = args.root.resolve()
    if not args.skip_padim and (root / "magnetic_tile").is_dir():
        print(
            f"\n## PaDiM (efficientnet_lite0) on MTD magnetic_tile, {args.train} train / "
            f"{args.test} test images, {args.size} px, batch 8\n"
        )
        print("| runtime | fit s | test s | total s | x eager | backbone s | image AUROC | load |")
        print("|---|---|---|---|---|---|---|---|")
        for runtime in ("eager", "openvino"):
            options = {
                "runtime": runtime,
                "root": str(root),
                "size": args.size,
                "n_train": args.train,
                "n_test": args.test,
                "batch": 8,
                "threads": args.threads,
            }
            row = _child("padim", options, args.timeout)
            if row is None:
                continue
            padim.append(row)
            ratio = padim[0]["total_s"] / row["total_s"]
            print(
                f"| {runtime} | {row['fit_s']:.1f} | {row['test_s']:.1f} | {row['total_s']:.1f} "
                f"| {ratio:.2f} | {row['backbone_s']:.1f} | {row['image_auroc']:.4f} | "
                f"{row['load']} |",
                flush=True,
            )
        if len(padim) == 2:
            first, second = (row["scores"] for row in padim)
            gap = max(abs(a - b) for a, b in zip(first, second, strict=True))
            print(
                f"\nlargest score difference eager vs openvino: {gap:.2e} "
                f"(scores up to {max(map(abs, first)):.1f})"
            )
    elif not args.skip_padim:
        print(f"\nPaDiM skipped: {root / 'magnetic_tile'} does not exist")
    print(f"\nload average at end: {_load()}")
    if args.json:
        args.json.write_text(json.dumps({"backbones": rows, "padim": padim}, indent=1))


if __name__ == "__main__":
    main()
