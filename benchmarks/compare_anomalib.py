"""Compare our PatchCore and PaDiM with Anomalib 2.7's on the same images, side by side.

Anomalib is a yardstick only: it is installed into a throwaway virtual environment outside the
repository (created on first use, reused while its requirements stay the same) and driven by
``_anomalib_runner.py`` in a separate process. The project never imports it.

Both sides:

- read the same files: a temporary MVTec-layout folder of symlinks holding a seeded sample of
  ``--train-limit`` good training images (the same for both) and the test images (all of them,
  or a seeded sample of ``--test-limit``);
- resize every image on its own to ``--image-size`` squared (bilinear, antialiased; ours with
  Pillow, Anomalib's with torchvision), no centre crop, ImageNet normalization;
- use the same ``efficientnet_lite0`` ImageNet weights: the state dict our weight provider
  returns is written to a ``.safetensors`` file that the Anomalib process loads into timm
  (checked tensor by tensor there; a fingerprint of both sides is reported);
- pick the same feature levels: PatchCore strides 8 and 16 (timm ``blocks.2``, ``blocks.4``),
  coreset ratio 0.1, 9 neighbours, 3x3 patch neighbourhood, Gaussian sigma 4; PaDiM strides 4,
  8 and 16 (``blocks.1``, ``blocks.2``, ``blocks.4``), 100 random features;
- fit through their own Engine (one pass over the training images, the memory bank or the
  Gaussians built at the end of the epoch, then one validation pass over the test images) and
  predict the test images through their Engine, in a child process of their own so that peak
  RSS is that run's alone (the child's own ``VmHWM``).

Each run writes raw image scores and anomaly maps (at the image size) to an ``.npz``; this
process computes image AUROC, pixel AUROC and AUPRO for every run with ``anomaly.metrics``
against one ground truth (our masks, resized with nearest neighbour), so the numbers compare.

Our PatchCore runs twice: ``exact`` greedy coreset selection over all patches (as Anomalib
does) and ``approximate`` (our default: greedy selection within blocks of patches); with a
``coreset_mode`` option on ``Patchcore`` that is used, else ``coreset_block_size``.

Figures: ``fit s`` runs from the start of ``Engine.fit`` until the memory bank (PatchCore) or
the Gaussians (PaDiM) are built; ``bank s`` is that last step alone (coreset selection for
PatchCore); ``test img/s`` is test images over the wall time of the Engine's predict call,
image loading included. The ``CPU s`` columns are the process's CPU time (all threads) over
the same spans: on a shared machine they move much less than wall time. Peak RSS is the
child's maximum resident memory, read from its ``VmHWM`` at the end (``ru_maxrss`` from
``wait4`` would also count the parent's memory at the fork, which Linux keeps across exec).
``fit+test MiB`` is that peak less the resident memory just before fitting (interpreter,
imports, model and data set up): what fitting and testing added, since the libraries and
torch's CUDA build alone take 800-1000 MiB before any work.
Ratios are ours over Anomalib's for the same model.

Anomalib's runs get ``MALLOC_MMAP_THRESHOLD_`` (1 MiB, ``--malloc-mmap-threshold``): its
greedy coreset allocates and frees one (patches x dimensions) tensor per selected patch, and
with glibc's self-adjusting threshold those blocks came from the heap and were never reused:
resident memory grew by about that tensor per step (17 GB after 1000 steps of a 20-image
fit) until the kernel killed the process. A fixed threshold returns them to the system, at a
price: every allocation above it is mapped and zeroed anew, which made torch's backbone two
to three times slower on this CPU. Our runs keep glibc's defaults unless
``--malloc-everywhere`` gives them the same setting.
A run is also killed past ``--max-rss-gib`` or ``--timeout``; its row then shows the error.

    python benchmarks/compare_anomalib.py --train-limit 20 --test-limit 60      # quick check
    python benchmarks/compare_anomalib.py --train-limit 100 --output compare.json
    python benchmarks/compare_anomalib.py --skip-anomalib --train-limit 0       # ours, all
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _memory import peak_rss_mib, rss_mib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / ".." / "shared" / "datasets" / "mtd"
DEFAULT_VENV = Path("~/.cache/anomaly-bench/anomalib-2.7").expanduser()
RUNNER = Path(__file__).resolve().with_name("_anomalib_runner.py")
ANOMALIB_REQUIREMENT = "anomalib==2.7.*"
# Pinned to the torch the project is developed with, and passed as constraints so that no
# dependency of Anomalib can pull in another torch.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
BACKBONE = "efficientnet_lite0"
SEED = 0
METRICS = ("image_auroc", "pixel_auroc", "aupro")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# The same feature levels on both sides: our strides, Anomalib's timm module names.
OURS_CONFIG: dict[str, dict[str, Any]] = {
    "patchcore": {
        "backbone": BACKBONE,
        "strides": [8, 16],
        "coreset_ratio": 0.1,
        "num_neighbors": 9,
        "patch_size": 3,
        "embedding_dim": None,
        "sigma": 4.0,
    },
    "padim": {"backbone": BACKBONE, "strides": [4, 8, 16], "n_features": 100, "sigma": 4.0},
}
MODES = ("exact", "approximate")  # our PatchCore's coreset modes
ANOMALIB_LAYERS = {
    "patchcore": ["blocks.2", "blocks.4"],
    "padim": ["blocks.1", "blocks.2", "blocks.4"],
}
ANOMALIB_OPTIONS: dict[str, dict[str, Any]] = {
    "patchcore": {"coreset_sampling_ratio": 0.1, "num_neighbors": 9},
    "padim": {"n_features": 100},
}
FINGERPRINT_KEYS = ("conv_stem.weight", "blocks.1.0.conv_pw.weight", "blocks.4.2.conv_pwl.weight")


@dataclass(frozen=True)
class Run:
    """One fit-and-predict job."""

    library: str  # "ours" or "anomalib"
    model: str  # "patchcore" or "padim"
    variant: str  # e.g. "exact", "approximate", "" when the model has one
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.library}-{self.model}" + (f"-{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Subset:
    """The images both libraries read, as keys ``<folder>/<file name>`` of the test set."""

    category_dir: Path  # MVTec layout of symlinks
    mask_dir: Path  # masks named like their images, for Anomalib's Folder datamodule
    train: list[str]
    test: list[str]


# --- data ---------------------------------------------------------------------------------


def _images(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _sample(paths: list[Path], limit: int, seed: int) -> list[Path]:
    """A seeded sample of ``limit`` paths (all when ``limit`` is 0 or too large), sorted."""
    if limit <= 0 or limit >= len(paths):
        return list(paths)
    import numpy as np

    picked = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
    return [paths[int(index)] for index in sorted(picked)]


def _mask_of(category: Path, defect: str, image: Path) -> Path:
    for suffix in ("_mask.png", ".png"):
        candidate = category / "ground_truth" / defect / f"{image.stem}{suffix}"
        if candidate.is_file():
            return candidate
    msg = (
        f"no mask for {image.name!r} in {str(category / 'ground_truth' / defect)!r}; expected "
        f"{image.stem}_mask.png"
    )
    raise FileNotFoundError(msg)


def build_subset(
    root: Path, category: str, destination: Path, train_limit: int, test_limit: int
) -> Subset:
    """Link the chosen images (and their masks) into an MVTec-layout folder.

    Args:
        root: Folder holding ``category`` in the MVTec AD layout.
        category: Category folder name.
        destination: Empty folder to build in.
        train_limit: Good training images to keep (seeded sample); 0 keeps all.
        test_limit: Test images to keep (seeded sample over all of them); 0 keeps all.
    """
    source = (root / category).resolve()
    if not (source / "train" / "good").is_dir() or not (source / "test").is_dir():
        msg = f"{str(source)!r} is not an MVTec-layout category (train/good and test needed)"
        raise FileNotFoundError(msg)
    category_dir = destination / category
    mask_dir = destination / "masks_by_image_name"
    train = _sample(_images(source / "train" / "good"), train_limit, SEED)
    every_test = [
        image
        for folder in sorted(path for path in (source / "test").iterdir() if path.is_dir())
        for image in _images(folder)
    ]
    test = _sample(every_test, test_limit, SEED + 1)
    labels = {image.parent.name == "good" for image in test}
    if labels != {True, False}:
        msg = f"the test sample of {len(test)} images lacks good or defective ones; raise it"
        raise ValueError(msg)
    (category_dir / "train" / "good").mkdir(parents=True)
    for image in train:
        (category_dir / "train" / "good" / image.name).symlink_to(image)
    for image in test:
        defect = image.parent.name
        (category_dir / "test" / defect).mkdir(parents=True, exist_ok=True)
        (category_dir / "test" / defect / image.name).symlink_to(image)
        if defect != "good":
            mask = _mask_of(source, defect, image)
            for folder, name in (
                (category_dir / "ground_truth" / defect, f"{image.stem}_mask.png"),
                # Anomalib's Folder pairs sorted images with sorted masks: same stems keep
                # the two orders equal.
                (mask_dir / defect, f"{image.stem}{mask.suffix}"),
            ):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).symlink_to(mask)
    return Subset(
        category_dir=category_dir,
        mask_dir=mask_dir,
        train=[image.name for image in train],
        test=[f"{image.parent.name}/{image.name}" for image in test],
    )


def image_key(path: str) -> str:
    """``<folder>/<file name>``: the same for a symlink and its target."""
    parts = Path(path).parts
    return f"{parts[-2]}/{parts[-1]}"


def ground_truth(subset: Subset, size: int) -> dict[str, tuple[int, Any]]:
    """Label and (size, size) bool mask tensor of every test image, by key."""
    import torch

    from anomaly.io import mask_to_tensor, read_mask

    truth: dict[str, tuple[int, Any]] = {}
    for key in subset.test:
        defect, name = key.split("/")
        if defect == "good":
            truth[key] = (0, torch.zeros(size, size, dtype=torch.bool))
        else:
            mask = subset.category_dir / "ground_truth" / defect / f"{Path(name).stem}_mask.png"
            truth[key] = (1, mask_to_tensor(read_mask(mask), (size, size)))
    return truth


def compute_metrics(
    predictions: Path, truth: dict[str, tuple[int, Any]], batch_size: int = 32
) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AUPRO of one run's raw predictions, with our metrics."""
    import numpy as np
    import torch

    from anomaly import Batch
    from anomaly.metrics import AUPRO, ImageAUROC, PixelAUROC

    with np.load(predictions) as data:
        scores, maps, paths = data["scores"], data["maps"], [str(p) for p in data["paths"]]
    keys = [image_key(path) for path in paths]
    missing = sorted(set(truth) - set(keys))
    unknown = sorted(set(keys) - set(truth))
    if missing or unknown or len(keys) != len(set(keys)):
        msg = (
            f"{predictions.name}: predictions do not cover the test set once each "
            f"(missing {missing[:3]!r}, unknown {unknown[:3]!r}, {len(keys)} rows)"
        )
        raise ValueError(msg)
    metrics = {"image_auroc": ImageAUROC(), "pixel_auroc": PixelAUROC(), "aupro": AUPRO()}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        batch = Batch(
            image=torch.zeros(len(chunk), 3, 1, 1),
            gt_label=torch.tensor([truth[key][0] for key in chunk]),
            gt_mask=torch.stack([truth[key][1] for key in chunk]),
            image_path=tuple(chunk),
            pred_score=torch.from_numpy(scores[start : start + batch_size].astype(np.float32)),
            anomaly_map=torch.from_numpy(maps[start : start + batch_size].astype(np.float32)),
        )
        for metric in metrics.values():
            metric.update(batch)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


# --- weights and the throwaway environment ------------------------------------------------


def save_weights(path: Path) -> dict[str, Any]:
    """Write our ``efficientnet_lite0`` ImageNet state dict to ``path`` (.safetensors)."""
    from safetensors.torch import save_file

    from anomaly.backbones import resolve_weights

    state = resolve_weights(BACKBONE, None, None)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"file": str(path), "sha256": digest, "tensors": len(state)}


def ensure_venv(venv: Path, log: Path) -> Path:
    """Create (or reuse) the virtual environment with Anomalib; return its Python.

    The environment is reused while its marker file lists the same requirements; otherwise
    pip installs them, with the torch pins also passed as constraints.
    """
    python = venv / "bin" / "python"
    marker = venv / "anomaly-bench.json"
    wanted = {"requirements": [ANOMALIB_REQUIREMENT, *TORCH_PINS]}
    with contextlib.suppress(OSError, ValueError):
        if python.exists() and json.loads(marker.read_text()) == wanted:
            return python
    if not python.exists():
        _say(f"creating the virtual environment {venv} ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")
    command = [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    command += [ANOMALIB_REQUIREMENT, *TORCH_PINS]
    _say(f"installing {ANOMALIB_REQUIREMENT} into {venv} (log: {log}) ...")
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        msg = f"pip could not install {ANOMALIB_REQUIREMENT} into {str(venv)!r}; see {str(log)!r}"
        raise RuntimeError(msg)
    check = "import torch, anomalib; print(torch.__version__, anomalib.__version__)"
    versions = subprocess.run(
        [str(python), "-c", check], capture_output=True, text=True, check=True
    ).stdout.split()
    if not versions[0].startswith(TORCH_PINS[0].split("==")[1]):
        msg = f"the virtual environment {str(venv)!r} got torch {versions[0]!r}; remove it"
        raise RuntimeError(msg)
    marker.write_text(json.dumps(wanted) + "\n")
    return python


# --- child processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    stopped: str | None  # why it was killed, None when it ended by itself


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_child(
    command: Sequence[str],
    log: Path,
    timeout: float,
    max_rss_gib: float,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Run ``command`` with output to ``log``; return its exit code, CPU time and peak RSS.

    ``os.wait4`` reports the CPU time of exactly this child (and what it waited for); its
    ``ru_maxrss`` also counts the parent's resident memory at the fork, so the children report
    their own ``VmHWM`` instead. The child is killed when it runs past
    ``timeout`` seconds or its resident memory passes ``max_rss_gib`` (the machine is shared:
    better one failed run than the kernel's OOM killer choosing a process).
    """
    start = time.perf_counter()
    stopped: str | None = None
    with log.open("w") as stream:
        process = subprocess.Popen(
            list(command),
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            if stopped is None:
                if time.perf_counter() - start > timeout:
                    stopped = f"timed out after {timeout:.0f} s"
                elif _rss_kib(process.pid) > max_rss_gib * 2**20:
                    stopped = f"resident memory passed {max_rss_gib:g} GiB"
                if stopped is not None:
                    # SIGKILL, not SIGTERM, which Lightning catches and goes on; the child
                    # leads its own session, so this ends it and anything it started.
                    os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(
        returncode=process.returncode,
        seconds=time.perf_counter() - start,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mib=usage.ru_maxrss / 1024,  # KiB on Linux
        stopped=stopped,
    )


def ours_worker(job_file: Path) -> None:
    """Fit and predict one of our models through ``anomaly.Engine`` (in a child process)."""
    import functools

    import lightning.pytorch as pl
    import numpy as np
    import torch

    from anomaly import Batch, Engine, get_plugin_manager

    job = json.loads(job_file.read_text())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(SEED)

    class Collector(pl.Callback):
        """Keep only what the metrics need: raw scores, raw maps and paths."""

        def __init__(self) -> None:
            self.scores: list[np.ndarray] = []
            self.maps: list[np.ndarray] = []
            self.paths: list[str] = []

        def on_predict_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
        ) -> None:
            assert isinstance(outputs, Batch)
            score = outputs.raw_score if outputs.raw_score is not None else outputs.pred_score
            maps = outputs.raw_map if outputs.raw_map is not None else outputs.anomaly_map
            assert score is not None
            assert maps is not None
            self.scores.append(score.detach().float().cpu().numpy())
            self.maps.append(maps.detach().float().cpu().numpy())
            self.paths.extend(outputs.image_path)

    pm = get_plugin_manager()
    category_dir = Path(job["category_dir"])
    datamodule_class: Any = pm.datamodule("mvtec_ad").load()
    data = datamodule_class(
        root=str(category_dir.parent),
        category=category_dir.name,
        image_size=job["image_size"],
        val_split="same_as_test",
        train_batch_size=job["batch_size"],
        eval_batch_size=job["batch_size"],
        num_workers=0,
    )
    start = time.perf_counter()
    model_class: Any = pm.model(job["model"]).load()
    model = model_class(**job["options"])
    build_seconds = time.perf_counter() - start

    bank: dict[str, float] = {}
    fit_end = model.fit_end

    @functools.wraps(fit_end)
    def timed_fit_end() -> None:
        bank["start"] = time.perf_counter()
        bank["cpu_start"] = time.process_time()
        fit_end()
        bank["end"] = time.perf_counter()
        bank["cpu_end"] = time.process_time()

    model.fit_end = timed_fit_end
    collector = Collector()
    engine = Engine(plugin_manager=pm, accelerator="cpu", devices=1, callbacks=[collector])
    rss_before_fit = rss_mib()
    fit_start = time.perf_counter()
    fit_cpu_start = time.process_time()
    fitted = engine.fit(model, data)
    fit_total = time.perf_counter() - fit_start
    test_start = time.perf_counter()
    test_cpu_start = time.process_time()
    engine.predict(model, data, keep_batches=False)
    test_seconds = time.perf_counter() - test_start
    test_cpu_seconds = time.process_time() - test_cpu_start

    scores = np.concatenate(collector.scores)
    np.savez(
        job["predictions"],
        scores=scores,
        maps=np.concatenate(collector.maps),
        paths=np.array(collector.paths),
    )
    state = {
        key.rsplit("model.", 1)[-1]: value
        for key, value in model.state_dict().items()
        if "feature_extractor" in key
    }
    memory_bank = getattr(model.model, "memory_bank", None)
    result = {
        "library": "ours",
        "rss_before_fit_mib": rss_before_fit,
        "peak_rss_mib": peak_rss_mib(),
        "model": job["model"],
        "options": job["options"],
        "strides": list(model.model.feature_extractor.strides),
        "build_seconds": build_seconds,
        "fit_seconds": bank["end"] - fit_start,
        "bank_seconds": bank["end"] - bank["start"],
        "fit_cpu_seconds": bank["cpu_end"] - fit_cpu_start,
        "bank_cpu_seconds": bank["cpu_end"] - bank["cpu_start"],
        "engine_fit_seconds": fit_total,
        "engine_fit_seconds_reported": fitted.seconds,
        "train_images": fitted.train_images,
        "memory_bank": None if memory_bank is None else int(memory_bank.shape[0]),
        "test_images": int(scores.shape[0]),
        "test_seconds": test_seconds,
        "test_cpu_seconds": test_cpu_seconds,
        "weights": {
            "fingerprint": {
                key: float(state[key].double().sum()) for key in FINGERPRINT_KEYS if key in state
            }
        },
        "threads": torch.get_num_threads(),
    }
    Path(job["result"]).write_text(json.dumps(result, indent=2) + "\n")


# --- the comparison -----------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ours_runs(
    models: Sequence[str], backbone_runtime: str = "eager", modes: Sequence[str] = MODES
) -> list[Run]:
    """Our runs: PatchCore with each coreset mode of ``modes``, and PaDiM.

    A backbone runtime other than eager is named in the variant (``approximate+openvino``).
    """
    suffix = "" if backbone_runtime == "eager" else backbone_runtime
    runs = []
    for name in models:
        options = dict(OURS_CONFIG[name])
        if suffix:
            options["backbone_runtime"] = backbone_runtime
        if name != "patchcore":
            runs.append(Run("ours", name, suffix, options))
            continue
        for mode in modes:
            variant = f"{mode}+{suffix}" if suffix else mode
            runs.append(Run("ours", name, variant, {**options, "coreset_mode": mode}))
    return runs


def anomalib_runs(models: Sequence[str]) -> list[Run]:
    return [Run("anomalib", name, "", dict(ANOMALIB_OPTIONS[name])) for name in models]


def execute(
    run: Run,
    args: argparse.Namespace,
    subset: Subset,
    work: Path,
    weights: dict[str, Any] | None,
    python: Path | None,
) -> dict[str, Any]:
    """Run one job in a child process; return its figures (or its error)."""
    folder = work / run.label
    folder.mkdir()
    job: dict[str, Any] = {
        "model": run.model,
        "options": run.options,
        "category_dir": str(subset.category_dir),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "predictions": str(folder / "predictions.npz"),
        "result": str(folder / "result.json"),
    }
    env = dict(os.environ, TQDM_DISABLE="1")
    if args.malloc_mmap_threshold > 0 and (run.library == "anomalib" or args.malloc_everywhere):
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if run.library == "anomalib":
        assert weights is not None
        assert python is not None
        job |= {
            "mask_dir": str(subset.mask_dir),
            "weights": weights["file"],
            "backbone": BACKBONE,
            "layers": ANOMALIB_LAYERS[run.model],
            "work_dir": str(folder),
        }
        command = [str(python), str(RUNNER), str(folder / "job.json")]
        # Keep the project's packages out of the other environment.
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--ours-worker"]
        command.append(str(folder / "job.json"))
    (folder / "job.json").write_text(json.dumps(job, indent=2) + "\n")
    _say(f"running {run.label} ...")
    child = run_child(command, folder / "log.txt", args.timeout, args.max_rss_gib, env)
    row: dict[str, Any] = {
        "library": run.library,
        "model": run.model,
        "variant": run.variant,
        "wall_seconds": child.seconds,
        "cpu_seconds": child.cpu_seconds,
        "peak_rss_mib": child.peak_rss_mib,
    }
    if child.stopped is not None or child.returncode != 0:
        tail = (folder / "log.txt").read_text(errors="replace")[-2000:]
        reason = child.stopped or "failed"
        row["error"] = f"{reason} (exit {child.returncode}); log tail:\n{tail}"
        _say(f"{run.label} {row['error']}")
        return row
    row |= json.loads((folder / "result.json").read_text())
    row["working_mib"] = row["peak_rss_mib"] - row["rss_before_fit_mib"]
    row["test_images_per_second"] = row["test_images"] / row["test_seconds"]
    row["test_images_per_cpu_second"] = row["test_images"] / row["test_cpu_seconds"]
    _say(f"{run.label}: fit {row['fit_seconds']:.1f} s, wall {child.seconds:.0f} s")
    return row


# (row key, column title, digits); the ratio columns repeat the starred ones as ours/theirs.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("image_auroc", "image AUROC", 4),
    ("pixel_auroc", "pixel AUROC", 4),
    ("aupro", "AUPRO", 4),
    ("fit_seconds", "fit s", 1),
    ("fit_cpu_seconds", "fit CPU s", 1),
    ("bank_seconds", "bank s", 1),
    ("bank_cpu_seconds", "bank CPU s", 1),
    ("test_images_per_second", "test img/s", 2),
    ("test_images_per_cpu_second", "test img/CPU s", 2),
    ("peak_rss_mib", "peak RSS MiB", 0),
    ("working_mib", "fit+test MiB", 0),
)
RATIOS = (
    "fit_seconds",
    "fit_cpu_seconds",
    "bank_cpu_seconds",
    "test_images_per_second",
    "test_images_per_cpu_second",
    "peak_rss_mib",
    "working_mib",
)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ours over Anomalib's for the same model (speeds: above 1 is faster; times: below)."""
    theirs = {
        row["model"]: row for row in rows if row["library"] == "anomalib" and "error" not in row
    }
    for row in rows:
        base = theirs.get(row["model"])
        if row["library"] != "ours" or base is None or "error" in row:
            continue
        row["ratios"] = {name: row[name] / base[name] for name in RATIOS if base.get(name)}


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ratio_cell(value: float | None) -> str:
    # Three significant digits: a coreset ratio can be 0.0015.
    return "n/a" if value is None else f"{value:.3g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per run; the ratio columns are ours over Anomalib's for the same model."""
    titles = {key: title for key, title, _ in COLUMNS}
    header = ["library", "model", *titles.values(), *(f"{titles[key]} ratio" for key in RATIOS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        model = row["model"] + (f" ({row['variant']})" if row["variant"] else "")
        if "error" in row:
            first = row["error"].splitlines()[0]
            cells = [row["library"], model, f"error: {first}", *[""] * (len(header) - 3)]
        else:
            ratios = row.get("ratios", {})
            cells = [
                row["library"],
                model,
                *(_cell(row.get(key), digits) for key, _, digits in COLUMNS),
                *(_ratio_cell(ratios.get(key)) for key in RATIOS),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def work_folder(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=False)
        yield keep
        return
    folder = Path(tempfile.mkdtemp(prefix="anomaly-compare-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MVTec-layout root")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(OURS_CONFIG), default=["patchcore", "padim"]
    )
    parser.add_argument(
        "--train-limit", type=int, default=100, help="good training images (seeded); 0: all"
    )
    parser.add_argument(
        "--test-limit", type=int, default=0, help="test images (seeded sample); 0: all"
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument(
        "--max-rss-gib", type=float, default=12.0, help="kill a run whose memory passes this"
    )
    parser.add_argument(
        "--malloc-everywhere",
        action="store_true",
        help="give our runs Anomalib's MALLOC_MMAP_THRESHOLD_ too",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=2**20,
        help="glibc MALLOC_MMAP_THRESHOLD_ of Anomalib's runs, in bytes; 0: glibc's default",
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="our coreset modes"
    )
    parser.add_argument(
        "--backbone-runtime",
        choices=["eager", "channels_last", "compile", "openvino"],
        default="eager",
        help="how our frozen backbone runs (same features within float rounding)",
    )
    parser.add_argument("--skip-anomalib", action="store_true", help="run ours only")
    parser.add_argument("--skip-ours", action="store_true", help="run Anomalib's only")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Anomalib's venv")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="keep links, logs and predictions in this new folder",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="print one table from the --output reports of runs on the same images",
    )
    parser.add_argument("--ours-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def summarize(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    subset: Subset,
    weights: dict[str, Any] | None,
    started: float,
) -> tuple[str, dict[str, Any]]:
    """Return the printed report (title and table) and the JSON one, ratios included."""
    add_ratios(rows)
    fingerprints = {
        json.dumps(row["weights"]["fingerprint"], sort_keys=True)
        for row in rows
        if "error" not in row
    }
    weights_note = (
        "backbone weights: the same in every run (fingerprint of 3 tensors)"
        if len(fingerprints) <= 1
        else f"backbone weights DIFFER between runs: {sorted(fingerprints)}"
    )
    title = (
        f"{args.category}: {len(subset.train)} training images (seeded sample), "
        f"{len(subset.test)} test images, {args.image_size} px, CPU, {os.cpu_count()} cores; "
        f"{weights_note}"
    )
    table = markdown_table(rows)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "config": {
            "root": str(args.root),
            "category": args.category,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "train_limit": args.train_limit,
            "test_limit": args.test_limit,
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
            "malloc_everywhere": args.malloc_everywhere,
            "ours": {name: OURS_CONFIG[name] for name in args.models},
            "anomalib": {
                name: {"layers": ANOMALIB_LAYERS[name], **ANOMALIB_OPTIONS[name]}
                for name in args.models
            },
            "anomalib_requirement": ANOMALIB_REQUIREMENT,
            "weights": weights,
        },
        "title": title,
        "train_images": subset.train,
        "test_images": len(subset.test),
        "rows": rows,
        "table": table,
    }
    return f"{title}\n\n{table}", report


def merge(paths: Sequence[Path], output: Path | None) -> None:
    """Print one table from reports of the same comparison run separately (e.g. in parallel)."""
    reports = [json.loads(path.read_text()) for path in paths]
    first = reports[0]
    for path, report in zip(paths, reports, strict=True):
        same = (report["train_images"], report["test_images"], report["config"]["image_size"])
        if same != (first["train_images"], first["test_images"], first["config"]["image_size"]):
            msg = f"{str(path)!r} was measured on other images than {str(paths[0])!r}"
            raise SystemExit(msg)
    rows = [row for report in reports for row in report["rows"]]
    for row in rows:
        row.pop("ratios", None)
    add_ratios(rows)
    title = first["title"].split(";")[0] + f"; merged from {len(paths)} reports"
    table = markdown_table(rows)
    print(f"{title}\n\n{table}")
    if output is not None:
        merged = {**first, "title": title, "merged_from": [str(p) for p in paths]}
        weights = [report["config"]["weights"] for report in reports]
        merged["config"] = {**first["config"], "weights": next(filter(None, weights), None)}
        merged |= {"rows": rows, "table": table}
        output.write_text(json.dumps(merged, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ours_worker is not None:
        ours_worker(args.ours_worker)
        return
    if args.merge is not None:
        merge(args.merge, args.output)
        return
    if args.skip_ours and args.skip_anomalib:
        msg = "--skip-ours and --skip-anomalib leave nothing to run; drop one"
        raise SystemExit(msg)

    runs = [] if args.skip_ours else ours_runs(args.models, args.backbone_runtime, args.modes)
    if not args.skip_anomalib:
        runs += anomalib_runs(args.models)
    started = time.time()
    rows: list[dict[str, Any]] = []
    with work_folder(args.keep) as work:
        subset = build_subset(
            args.root, args.category, work / "data", args.train_limit, args.test_limit
        )
        _say(f"{len(subset.train)} training and {len(subset.test)} test images, links in {work}")
        truth = ground_truth(subset, args.image_size)
        python = weights = None
        if not args.skip_anomalib:
            python = ensure_venv(args.venv.expanduser(), work / "pip.log")
            weights = save_weights(work / f"{BACKBONE}.safetensors")
        for run in runs:
            row = execute(run, args, subset, work, weights, python)
            if "error" not in row:
                row |= compute_metrics(work / run.label / "predictions.npz", truth)
                _say(", ".join(f"{name} {row[name]:.4f}" for name in METRICS))
            rows.append(row)
            # Written after every run, so that a long comparison cut short keeps what it has.
            text, report = summarize(args, rows, subset, weights, started)
            if args.output is not None:
                args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
