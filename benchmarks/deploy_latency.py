"""Latency, throughput and memory of PatchCore and PaDiM in every runtime, on the same images.

Fits (or reuses) each model at 256 px on one category of an MVTec-layout dataset (default: the
magnetic tiles of ../shared/datasets/mtd), exports it to torch, ONNX and OpenVINO FP32, FP16
and INT8, and times each runtime on the same test images, each in its own subprocess so its
peak RSS is its own:

- torch eager: the model itself, wrapped with the same resizing and post-processing as the
  exports (``anomaly_deploy.export.InferenceGraph``); also with a channels_last backbone;
- torch .pt2: the ``torch.export`` program;
- ONNX Runtime (CPU);
- OpenVINO FP32, FP16 and INT8 with float32 arithmetic (what ``OpenVINOInferencer`` uses by
  default), and FP32 and INT8 at the CPU's default precision (bf16 where the CPU has it).

Runtimes run with idle threads that sleep (``OMP_WAIT_POLICY=PASSIVE``, no ONNX Runtime
spinning): on a machine busy with other work, spinning OpenMP threads made torch up to 20
times slower, which measures the contention rather than the runtime. ``--spin`` keeps the
defaults, for an otherwise idle machine.

Reported: latency p50 and p95 per batch of 1 and of 8 images, throughput (images/s at batch
8), peak RSS, throughput relative to torch eager, and agreement with torch eager (largest
normalized-score difference, share of equal labels). Two references: the backbone alone
(efficientnet_lite0 features at 256 px) in torch eager and OpenVINO, and for PatchCore the
nearest-neighbour search, measured as the difference to the same graph with a memory bank of
``num_neighbors`` rows (where the search costs next to nothing). A last table times the
resizing inside the graphs on 1024 x 1024 inputs.

Timings on a shared machine are contended: read ratios, not absolute numbers.

Usage::

    python benchmarks/deploy_latency.py --train-limit 50            # quick
    python benchmarks/deploy_latency.py                              # every training image
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _memory import peak_rss_mib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "datasets" / "mtd"


# --- worker: one runtime in its own process -----------------------------------------------


def _load_runner(job: dict[str, Any]) -> Any:
    """Return ``run(batch) -> list of arrays`` for the job's runtime."""
    kind = job["kind"]
    if kind in {"torch-eager", "torch-channels-last", "torch-eager-tiny-bank"}:
        import torch

        from anomaly import Engine
        from anomaly_deploy.export import InferenceGraph

        engine = Engine()
        model = engine.load_model(job["checkpoint"])
        if kind == "torch-channels-last":
            options = {**dict(model.hparams), "backbone_runtime": "channels_last"}
            rebuilt = type(model)(**options)
            rebuilt.load_state_dict(model.state_dict())
            rebuilt.input_size = model.input_size
            model = rebuilt.eval()
        if kind == "torch-eager-tiny-bank":
            net: Any = model.model
            net.set_memory_bank(net.memory_bank[: max(1, net.num_neighbors)].clone())
        graph = InferenceGraph(model).eval()

        def run_torch(batch: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                return [out.numpy() for out in graph(torch.from_numpy(batch))]

        return run_torch
    if kind == "torch-pt2":
        import torch

        module = torch.export.load(job["path"]).module()

        def run_pt2(batch: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                return [out.numpy() for out in module(torch.from_numpy(batch))]

        return run_pt2
    if kind == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if job.get("passive"):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(job["path"], options, providers=["CPUExecutionProvider"])

        def run_ort(batch: np.ndarray) -> list[np.ndarray]:
            return list(session.run(None, {"image": batch}))

        return run_ort
    if kind in {"openvino", "backbone-openvino"}:  # the backbone's IR runs the same way
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY"}
        if job.get("hint"):
            config["INFERENCE_PRECISION_HINT"] = job["hint"]
        compiled = ov.Core().compile_model(job["path"], "CPU", config)
        request = compiled.create_infer_request()

        def run_ov(batch: np.ndarray) -> list[np.ndarray]:
            results = request.infer({0: batch})
            return [np.array(results[port]) for port in compiled.outputs]

        return run_ov
    if kind == "backbone-torch":
        import torch

        from anomaly.backbones import FeatureExtractor, imagenet_normalize

        extractor = FeatureExtractor("efficientnet_lite0", (8, 16)).eval()

        def run_backbone(batch: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                features = extractor(imagenet_normalize(torch.from_numpy(batch)))
            return [feature.numpy() for feature in features]

        return run_backbone
    msg = f"unknown job kind {kind!r}"
    raise ValueError(msg)


def _worker(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    images = np.load(job["images"])
    start = time.perf_counter()
    run = _load_runner(job)
    load_seconds = time.perf_counter() - start
    result: dict[str, Any] = {"load_s": load_seconds}
    for batch_size in job["batch_sizes"]:
        batches = [
            np.ascontiguousarray(images[(i * batch_size + np.arange(batch_size)) % len(images)])
            for i in range(max(1, job["repeats"]))
        ]
        for batch in batches[: job["warmup"]]:
            run(batch)
        times = []
        for batch in batches:
            tick = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - tick)
        times.sort()
        result[f"b{batch_size}"] = {
            "p50_ms": 1000 * statistics.median(times),
            "p95_ms": 1000 * times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
            "images_per_s": batch_size / statistics.median(times),
        }
    if job.get("scores"):
        outputs = [run(images[i : i + 8]) for i in range(0, len(images), 8)]
        result["pred_score"] = np.concatenate([out[0] for out in outputs]).tolist()
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def _run_job(job: dict[str, Any], folder: Path, timeout: float = 1800) -> dict[str, Any]:
    job_file = folder / f"job-{job['label'].replace(' ', '_').replace('/', '_')}.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if job.get("passive"):
        # Threads that sleep when idle: spinning OpenMP threads of torch lose up to 20x on a
        # machine busy with other work, which would measure the contention, not the runtime.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    done = subprocess.run(
        [sys.executable, __file__, "--worker", str(job_file)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=folder,  # anything a runtime writes stays out of the repository
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        print(f"  {job['label']}: failed: {' | '.join(tail)}", file=sys.stderr)
        return {}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- driver ----------------------------------------------------------------------------------


def _prepare_model(name: str, args: argparse.Namespace, folder: Path) -> tuple[Path, Any, Any]:
    """Fit (or reuse) ``name``; return its checkpoint, the model and the datamodule."""
    import torch

    from anomaly import Engine
    from anomaly_data.datamodules.mvtec_ad import MvtecAd

    data = MvtecAd(
        root=args.root,
        category=args.category,
        image_size=args.image_size,
        train_batch_size=16,
        eval_batch_size=16,
    )
    data.setup()
    if args.train_limit and data.train_data is not None:
        count = min(args.train_limit, len(data.train_data))  # type: ignore[arg-type]
        data.train_data = torch.utils.data.Subset(data.train_data, range(count))
    engine = Engine()
    checkpoint = folder / "model.ckpt"
    if checkpoint.is_file() and not args.refit:
        model = engine.load_model(checkpoint)
        print(f"{name}: reusing {checkpoint}", file=sys.stderr)
    else:
        model = engine.plugin_manager.model(name).load()()  # type: ignore[operator]
        fitted = engine.fit(model, data)
        engine.save_checkpoint(model, checkpoint)
        print(
            f"{name}: fitted on {fitted.train_images} images in {fitted.seconds:.0f} s",
            file=sys.stderr,
        )
    return checkpoint, model.eval(), data


def _export_all(model: Any, data: Any, folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    from anomaly import Engine

    engine = Engine()
    targets = {
        "torch": ("torch", {}),
        "onnx": ("onnx", {}),
        "openvino-fp32": ("openvino", {}),
        "openvino-fp16": ("openvino", {"precision": "fp16"}),
        "openvino-int8": (
            "openvino",
            {"precision": "int8", "datamodule": data, "calibration_size": args.calibration_size},
        ),
    }
    paths = {}
    for label, (fmt, options) in targets.items():
        target = folder / label
        if not (target / "metadata.json").is_file():
            start = time.perf_counter()
            engine.export(model, target, format=fmt, **options)
            print(f"  exported {label} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        paths[label] = target
    return paths


def _tiny_bank_export(model: Any, folder: Path) -> Path | None:
    """OpenVINO FP32 export of PatchCore with a memory bank of num_neighbors rows."""
    from anomaly_deploy.export import export_openvino

    net = getattr(model, "model", None)
    if net is None or not hasattr(net, "memory_bank"):
        return None
    target = folder / "openvino-fp32-tiny-bank"
    if not (target / "metadata.json").is_file():
        tiny = copy.deepcopy(model)
        tiny.model.set_memory_bank(net.memory_bank[: max(1, net.num_neighbors)].clone())
        export_openvino(tiny, target)
    return target


def _backbone_ir(folder: Path, size: int) -> Path:
    """The backbone alone (efficientnet_lite0, strides 8 and 16) as OpenVINO IR."""
    target = folder / "backbone.xml"
    if target.is_file():
        return target
    import openvino as ov
    import torch

    from anomaly.backbones import FeatureExtractor, imagenet_normalize

    extractor = FeatureExtractor("efficientnet_lite0", (8, 16)).eval()

    class Backbone(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(extractor(imagenet_normalize(image)))

    program = torch.export.export(
        Backbone().eval(),
        (torch.rand(2, 3, size, size),),
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
    )
    onnx_file = folder / "backbone.onnx"
    torch.onnx.export(program, dynamo=True, verbose=False).save(str(onnx_file))  # type: ignore[union-attr]
    ov.save_model(ov.Core().read_model(str(onnx_file)), str(target))
    return target


def _images(data: Any, count: int, size: tuple[int, int], folder: Path, name: str) -> Path:
    """Save ``count`` test images, resized to ``size``, as one (N, 3, H, W) float32 file."""
    from anomaly.io import image_to_tensor, read_image

    samples = data.test_data.samples
    # Evenly spaced over the test split, so every defect type and good images are in.
    chosen = np.unique(np.linspace(0, len(samples) - 1, min(count, len(samples))).round())
    paths = [samples[int(index)].image_path for index in chosen]
    array = np.stack([image_to_tensor(read_image(path), size).numpy() for path in paths])
    target = folder / f"{name}.npy"
    np.save(target, array.astype(np.float32))
    return target


def _row(label: str, result: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    if not result:
        return [label, *(["failed"] + [""] * 8)]
    b1, b8 = result["b1"], result.get("b8")
    ratio = ""
    if base and base.get("b1"):
        ratio = f"{result['b1']['images_per_s'] / base['b1']['images_per_s']:.2f}x"
        if b8 and base.get("b8"):
            ratio += f" / {b8['images_per_s'] / base['b8']['images_per_s']:.2f}x"
    agree = ""
    if base and "pred_score" in result and "pred_score" in base:
        ours, theirs = np.array(result["pred_score"]), np.array(base["pred_score"])
        agree = (
            f"{np.abs(ours - theirs).max():.3f} / {((ours >= 0.5) == (theirs >= 0.5)).mean():.0%}"
        )
    return [
        label,
        f"{b1['p50_ms']:.1f}",
        f"{b1['p95_ms']:.1f}",
        f"{b8['p50_ms']:.1f}" if b8 else "",
        f"{b8['p95_ms']:.1f}" if b8 else "",
        f"{(b8 or b1)['images_per_s']:.1f}",
        f"{result['peak_rss_mib']:.0f}",
        ratio,
        agree,
    ]


def _table(title: str, rows: list[list[str]]) -> str:
    header = [
        "runtime",
        "b1 p50 ms",
        "b1 p95 ms",
        "b8 p50 ms",
        "b8 p95 ms",
        "img/s (b8)",
        "peak RSS MiB",
        "vs eager (b1 / b8)",
        "max |Δscore| / labels",
    ]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--train-limit", type=int, default=0, help="0: every training image")
    parser.add_argument("--calibration-size", type=int, default=300)
    parser.add_argument("--images", type=int, default=48, help="test images timed")
    parser.add_argument("--repeats", type=int, default=30, help="timed batches per size")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "deploy_benchmark")
    parser.add_argument("--refit", action="store_true", help="fit again even if saved")
    parser.add_argument(
        "--spin",
        action="store_true",
        help="keep the runtimes' spinning idle threads (faster on an otherwise idle machine)",
    )
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    if not args.root.is_dir():
        sys.exit(f"dataset folder {str(args.root)!r} not found; pass --root")
    args.out.mkdir(parents=True, exist_ok=True)
    size = (args.image_size, args.image_size)
    report = [
        f"## Deploy latency: {args.category}, {args.image_size} px, "
        f"{os.cpu_count()} CPUs (shared machine: contended timings)\n"
    ]
    common = {
        "warmup": 3,
        "repeats": args.repeats,
        "batch_sizes": [1, 8],
        "passive": not args.spin,
    }
    for name in args.models.split(","):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint, model, data = _prepare_model(name, args, folder)
        exports = _export_all(model, data, folder, args)
        images = _images(data, args.images, size, folder, "images")
        jobs: list[tuple[str, dict[str, Any]]] = [
            ("torch eager", {"kind": "torch-eager", "checkpoint": str(checkpoint)}),
            (
                "torch eager channels_last",
                {"kind": "torch-channels-last", "checkpoint": str(checkpoint)},
            ),
            ("torch .pt2", {"kind": "torch-pt2", "path": str(exports["torch"] / "model.pt2")}),
            (
                "onnxruntime fp32",
                {"kind": "onnxruntime", "path": str(exports["onnx"] / "model.onnx")},
            ),
        ]
        for precision in ("fp32", "fp16", "int8"):
            xml = str(exports[f"openvino-{precision}"] / "model.xml")
            f32 = {"kind": "openvino", "path": xml, "hint": "f32"}
            jobs.append((f"openvino {precision} (f32 math)", f32))
            if precision != "fp16":
                default = {"kind": "openvino", "path": xml}
                jobs.append((f"openvino {precision} (CPU default math)", default))
        results: dict[str, dict[str, Any]] = {}
        for label, job in jobs:
            print(f"  timing {name}: {label}", file=sys.stderr)
            job = {
                **common,
                **job,
                "label": f"{name} {label}",
                "images": str(images),
                "scores": True,
            }
            results[label] = _run_job(job, folder)
        base = results.get("torch eager")
        rows = [_row(label, results[label], base) for label, _ in jobs]
        report.append(_table(f"{name}", rows))
        if name == "patchcore":
            tiny = _tiny_bank_export(model, folder)
            extra = {
                "torch eager, bank of 9 rows": {
                    "kind": "torch-eager-tiny-bank",
                    "checkpoint": str(checkpoint),
                },
            }
            if tiny is not None:
                extra["openvino fp32 (f32 math), bank of 9 rows"] = {
                    "kind": "openvino",
                    "path": str(tiny / "model.xml"),
                    "hint": "f32",
                }
            lines = ["### patchcore: nearest-neighbour search", ""]
            bank = int(model.model.memory_bank.shape[0])
            lines.append(
                f"memory bank: {bank} rows x {int(model.model.memory_bank.shape[1])} dims\n"
            )
            columns = [
                "runtime",
                "b1 p50 ms full",
                "b1 p50 ms tiny bank",
                "search share (b1)",
                "b8 p50 ms full",
                "b8 p50 ms tiny bank",
                "search share (b8)",
            ]
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "|".join("---" for _ in columns) + "|")
            pairs = [
                ("torch eager", "torch eager, bank of 9 rows"),
                ("openvino fp32 (f32 math)", "openvino fp32 (f32 math), bank of 9 rows"),
            ]
            for full, small in pairs:
                if small not in extra:
                    continue
                job = {**common, **extra[small], "label": f"{name} {small}", "images": str(images)}
                tiny_result = _run_job(job, folder)
                whole = results.get(full)
                if not tiny_result or not whole:
                    continue
                cells = [full]
                for key in ("b1", "b8"):
                    total, rest = whole[key]["p50_ms"], tiny_result[key]["p50_ms"]
                    cells += [
                        f"{total:.1f}",
                        f"{rest:.1f}",
                        f"{max(0.0, total - rest) / total:.0%}",
                    ]
                lines.append("| " + " | ".join(cells) + " |")
            report.append("\n".join(lines) + "\n")
        # The resize inside the graph on large inputs (a camera frame of 1024 x 1024).
        big = _images(data, 8, (1024, 1024), folder, "images-1024")
        rows = []
        resize_jobs = [
            ("torch eager", {"kind": "torch-eager", "checkpoint": str(checkpoint)}),
            (
                "onnxruntime fp32",
                {"kind": "onnxruntime", "path": str(exports["onnx"] / "model.onnx")},
            ),
            (
                "openvino fp32 (f32 math)",
                {
                    "kind": "openvino",
                    "path": str(exports["openvino-fp32"] / "model.xml"),
                    "hint": "f32",
                },
            ),
        ]
        resized: dict[str, dict[str, Any]] = {}
        for label, job in resize_jobs:
            job = {
                **job,
                "passive": not args.spin,
                "warmup": 2,
                "repeats": max(5, args.repeats // 3),
                "batch_sizes": [1],
                "label": f"{name} {label} 1024",
                "images": str(big),
            }
            resized[label] = _run_job(job, folder)
            rows.append(_row(label, resized[label], resized.get("torch eager")))
        report.append(
            _table(f"{name}, 1024 x 1024 inputs (resize inside the graph), batch 1", rows)
        )
        print("\n".join(report[-3:]), file=sys.stderr)
    # The backbone alone.
    folder = args.out / "backbone"
    folder.mkdir(parents=True, exist_ok=True)
    images = _images(data, args.images, size, folder, "images")
    ir = _backbone_ir(folder, args.image_size)
    rows = []
    backbone: dict[str, dict[str, Any]] = {}
    for label, job in (
        ("torch eager", {"kind": "backbone-torch"}),
        ("openvino (f32 math)", {"kind": "backbone-openvino", "path": str(ir), "hint": "f32"}),
        ("openvino (CPU default math)", {"kind": "backbone-openvino", "path": str(ir)}),
    ):
        job = {**common, **job, "label": f"backbone {label}", "images": str(images)}
        backbone[label] = _run_job(job, folder)
        rows.append(_row(label, backbone[label], backbone.get("torch eager")))
    report.append(
        _table(
            f"backbone alone: efficientnet_lite0 features (strides 8, 16) at {args.image_size} px",
            rows,
        )
    )
    text = "\n".join(report)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
