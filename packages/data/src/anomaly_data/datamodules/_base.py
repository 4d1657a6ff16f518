"""What every folder-backed datamodule shares: scanning, mask matching, checks and splits.

A subclass only says where the images are (``_layout``); this base class then lists the
images, pairs anomalous images with their masks, opens every file once to prove it can be
read, splits the images into train, validation and test (seeded) and describes the splits.
"""

from __future__ import annotations

import difflib
import enum
import logging
import os
import time
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly import AnomalyDataModule, ConfigError, DataError, SplitSummary
from anomaly.io import IMAGE_EXTENSIONS, read_image, read_mask
from anomaly_data.datasets import AnomalyImageDataset, Sample

__all__ = ["FolderLayout", "ImageFolderDataModule", "ValSplitMode"]

logger = logging.getLogger(__name__)


class ValSplitMode(enum.StrEnum):
    """Where the validation images, which teach thresholds and normalization, come from.

    ``from_test``: a stratified share of the test images (they then leave the test split).
    ``same_as_test``: the test images themselves; thresholds tuned on the images they are
    scored on make the reported F1 optimistic.
    ``from_train``: a share of the normal training images; with no anomalies to tune on,
    thresholds become a high quantile of the normal scores.
    """

    FROM_TEST = "from_test"
    SAME_AS_TEST = "same_as_test"
    FROM_TRAIN = "from_train"


@dataclass(frozen=True, slots=True)
class FolderLayout:
    """Where the images of a dataset lie; every path absolute or relative to the process.

    Attributes:
        root: Base folder; sources are described relative to it.
        normal_dir: Normal images (training, and test when ``normal_test_dir`` is None).
        abnormal_dirs: Folders of anomalous test images, one per defect type.
        mask_dir: Masks of the anomalous images, or None when there are none.
        normal_test_dir: Normal test images, or None to hold out part of ``normal_dir``.
    """

    root: Path
    normal_dir: Path
    abnormal_dirs: tuple[Path, ...] = ()
    mask_dir: Path | None = None
    normal_test_dir: Path | None = None


class ImageFolderDataModule(AnomalyDataModule):
    """Base of the datamodules that read image folders from disk.

    Args:
        test_split_ratio: Share of the normal images held out for testing when there is no
            separate folder of normal test images; in (0, 1).
        val_split: Where validation images come from; see ``ValSplitMode``.
        val_split_ratio: Share taken for validation by ``from_test`` (of the test images,
            per folder) and ``from_train`` (of the normal training images); in (0, 1).
        image_size: Side of the square images (or ``[height, width]``).
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the validation, test and predict loaders.
        num_workers: Worker processes per loader; 0 loads in the main process.
        seed: Seed of every random split; the same seed gives the same splits.
    """

    def __init__(
        self,
        *,
        test_split_ratio: float = 0.2,
        val_split: str = "from_test",
        val_split_ratio: float = 0.5,
        image_size: int | Sequence[int] = 256,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            image_size=image_size,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        if not isinstance(seed, int) or isinstance(seed, bool):
            msg = f"data.seed must be an integer, got {seed!r}"
            raise ConfigError(msg)
        self.test_split_ratio = _ratio("test_split_ratio", test_split_ratio)
        self.val_split_ratio = _ratio("val_split_ratio", val_split_ratio)
        self.val_split = _val_split_mode(val_split)
        self._is_set_up = False

    @abstractmethod
    def _layout(self) -> FolderLayout:
        """Check the configured folders exist (fetching them if asked) and return them."""

    def setup(self, stage: str | None = None) -> None:
        """List, check and split the images; a second call does nothing.

        Args:
            stage: Lightning's stage; every split is prepared whatever it is.

        Raises:
            DataError: When a folder is missing or empty, a file cannot be read, an anomalous
                image has no mask or a mask's size differs from its image's.
        """
        del stage
        if self._is_set_up:
            return
        layout = self._layout()
        normal, normal_test, abnormal = _collect(layout)
        _check_files(layout.root, [*normal, *normal_test, *abnormal])
        self._split(layout, normal, normal_test, abnormal)
        self._is_set_up = True
        for summary in self.summaries:
            logger.info(
                "%s: %d images (%d normal, %d anomalous, %d masks) from %s",
                summary.split,
                summary.images,
                summary.normal,
                summary.abnormal,
                summary.masks,
                summary.source,
            )

    def _split(
        self,
        layout: FolderLayout,
        normal: list[Sample],
        normal_test: list[Sample],
        abnormal: list[Sample],
    ) -> None:
        root = layout.root
        has_masks = layout.mask_dir is not None
        normal_name = _describe_dir(root, layout.normal_dir)
        if layout.normal_test_dir is None:
            test_normal, train = _take(normal, self.test_split_ratio, self._rng(1))
            train_source = f"{normal_name} ({_percent(len(train), len(normal))} of normal)"
            test_normal_source = f"{normal_name} ({_percent(len(test_normal), len(normal))})"
        else:
            train, test_normal = normal, normal_test
            train_source = f"{normal_name} (all)"
            test_normal_source = _describe_dir(root, layout.normal_test_dir)
        test = [*test_normal, *abnormal]
        parts = [test_normal_source] if test_normal else []
        if layout.abnormal_dirs:
            parts.append(_describe_dirs(root, layout.abnormal_dirs))
        test_source = " + ".join(parts) or "nothing"

        val: list[Sample]
        mode = self.val_split
        if mode is ValSplitMode.FROM_TEST:
            val, test = _take_stratified(test, self.val_split_ratio, self._rng(2))
            share = _percent(len(val), len(val) + len(test))
            val_source = f"{test_source}: {share} of test, stratified by folder"
            test_source = f"{test_source}: the rest"
        elif mode is ValSplitMode.SAME_AS_TEST:
            val = test
            val_source = "the test images (thresholds tuned on test: optimistic)"
        else:
            all_train = len(train)
            val, train = _take(train, self.val_split_ratio, self._rng(3))
            val_source = (
                f"{normal_name} ({_percent(len(val), all_train)} of training normals; "
                "thresholds from a normal-score quantile)"
            )
            train_source = f"{normal_name} ({_percent(len(train), all_train)} of training normals)"
        if not train:
            msg = (
                f"no normal images are left for training in {normal_name}; add images or "
                "lower data.test_split_ratio / data.val_split_ratio"
            )
            raise DataError(msg)
        if not val:
            msg = (
                f"the {mode.value!r} validation split is empty; add images or choose another "
                "data.val_split"
            )
            raise DataError(msg)

        def dataset(samples: Sequence[Sample]) -> AnomalyImageDataset:
            return AnomalyImageDataset(samples, self.image_size, has_masks=has_masks)

        self.train_data = train_data = dataset(train)
        self.test_data = test_data = dataset(test)
        self.val_data = val_data = test_data if mode is ValSplitMode.SAME_AS_TEST else dataset(val)
        self.summaries = [
            _summary("train", train_data, train_source),
            _summary("val", val_data, val_source),
            _summary("test", test_data, test_source),
        ]

    def _rng(self, purpose: int) -> np.random.Generator:
        # One stream per decision, so changing one ratio never reshuffles another split.
        return np.random.default_rng([self.seed, purpose])


def _ratio(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 < float(value) < 1.0
    ):
        msg = f"data.{name} must be a number strictly between 0 and 1, got {value!r}"
        raise ConfigError(msg)
    return float(value)


def _val_split_mode(value: str) -> ValSplitMode:
    modes = [mode.value for mode in ValSplitMode]
    if isinstance(value, str) and value in modes:
        return ValSplitMode(value)
    close = difflib.get_close_matches(str(value), modes, n=1, cutoff=0.4)
    hint = f"did you mean {close[0]!r}? " if close else ""
    msg = f"unknown data.val_split {value!r}; {hint}choose one of {', '.join(modes)}"
    raise ConfigError(msg)


def check_dir(path: Path, what: str, option: str) -> None:
    """Raise ``DataError`` unless ``path`` is an existing folder; name what is there instead."""
    if path.is_dir():
        return
    if path.exists():
        msg = f"{what} {str(path)!r} is a file, not a folder; check data.{option}"
        raise DataError(msg)
    parent = path.parent
    nearby = _subfolders(parent) if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, nearby, n=1)
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif nearby:
        hint = f"{str(parent)!r} holds {', '.join(repr(n) for n in nearby[:8])}"
    else:
        hint = "check the path"
    msg = f"{what} {str(path)!r} does not exist; {hint} (data.{option})"
    raise DataError(msg)


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(folder: Path, exclude: Iterable[Path]) -> list[Path]:
    """Every visible image file under ``folder``, recursively, sorted; skip ``exclude`` trees."""
    skipped = {p.resolve() for p in exclude}
    images: list[Path] = []
    ignored = 0
    for current, dirnames, filenames in os.walk(folder):
        here = Path(current)
        # Hidden folders (.git, .ipynb_checkpoints) and other configured folders are pruned.
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skipped
        )
        for name in filenames:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(here / name)
            else:
                ignored += 1
    if ignored:
        logger.debug("Ignored %d files that are not images in %s", ignored, folder)
    return sorted(images, key=lambda p: p.relative_to(folder).as_posix())


def _collect(layout: FolderLayout) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """List normal, normal-test and anomalous samples; match masks."""
    configured = [
        layout.normal_dir,
        *layout.abnormal_dirs,
        *(d for d in (layout.mask_dir, layout.normal_test_dir) if d is not None),
    ]

    def scan(folder: Path, label: int) -> list[Sample]:
        others = [d for d in configured if d.resolve() != folder.resolve()]
        paths = _list_images(folder, exclude=others)
        if not paths:
            msg = (
                f"folder {str(folder)!r} holds no images (looked for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add images or fix the path"
            )
            raise DataError(msg)
        source = _describe_dir(layout.root, folder)
        return [Sample(image_path=p, label=label, source=source) for p in paths]

    normal = scan(layout.normal_dir, 0)
    normal_test = scan(layout.normal_test_dir, 0) if layout.normal_test_dir is not None else []
    abnormal: list[Sample] = []
    owners: dict[Path, Path] = {}
    for folder in layout.abnormal_dirs:
        samples = scan(folder, 1)
        if layout.mask_dir is not None:
            samples = _attach_masks(samples, folder, layout.mask_dir, layout.root, owners)
        abnormal.extend(samples)
    return normal, normal_test, abnormal


class _MaskIndex:
    """The mask files under a folder, looked up by folder and lowercase file name."""

    def __init__(self, mask_dir: Path) -> None:
        self.mask_dir = mask_dir
        self.files: dict[Path, dict[str, Path]] = {}
        for path in _list_images(mask_dir, exclude=()):
            self.files.setdefault(path.parent, {})[path.name.lower()] = path

    def find(self, folder: Path, stem: str) -> Path | None:
        names = self.files.get(folder)
        if not names:
            return None
        if (found := names.get(f"{stem}.png".lower())) is not None:
            return found
        for extension in sorted(IMAGE_EXTENSIONS):
            if (found := names.get(f"{stem}_mask{extension}".lower())) is not None:
                return found
        return None


def _attach_masks(
    samples: list[Sample],
    abnormal_dir: Path,
    mask_dir: Path,
    root: Path,
    owners: dict[Path, Path],
) -> list[Sample]:
    """Pair each image with ``<stem>.png`` or ``<stem>_mask.<ext>`` under ``mask_dir``.

    Masks are looked for in a subfolder mirroring the image's folder first (its path relative
    to the root, then its name alone), then in ``mask_dir`` itself. ``owners`` maps each mask
    already claimed to its image, across folders, so one mask never serves two images.
    """
    index = _MaskIndex(mask_dir)
    matched: list[Sample] = []
    missing: list[Path] = []
    try:
        mirrored = [abnormal_dir.resolve().relative_to(root.resolve())]
    except ValueError:
        mirrored = []
    for sample in samples:
        inner = sample.image_path.parent.relative_to(abnormal_dir)
        candidates = [
            *(mask_dir / m / inner for m in mirrored),
            mask_dir / abnormal_dir.name / inner,
            mask_dir / inner,
            mask_dir,
        ]
        mask = next(
            (
                found
                for folder in dict.fromkeys(candidates)
                if (found := index.find(folder, sample.image_path.stem)) is not None
            ),
            None,
        )
        if mask is None:
            missing.append(sample.image_path)
            continue
        if (other := owners.setdefault(mask, sample.image_path)) != sample.image_path:
            msg = (
                f"mask {_relative(root, mask)!r} matches both {_relative(root, other)!r} and "
                f"{_relative(root, sample.image_path)!r}; put masks in subfolders named like "
                "the image folders"
            )
            raise DataError(msg)
        matched.append(
            Sample(image_path=sample.image_path, label=1, mask_path=mask, source=sample.source)
        )
    if missing:
        msg = (
            f"{len(missing)} of {len(samples)} anomalous images in {str(abnormal_dir)!r} have "
            f"no mask in {_relative(root, mask_dir)!r} (first: "
            f"{_relative(abnormal_dir, missing[0])!r}, expected "
            f"'{missing[0].stem}.png' or '{missing[0].stem}_mask.png'); add the masks or drop "
            "data.mask_dir"
        )
        raise DataError(msg)
    return matched


def _check_files(root: Path, samples: Sequence[Sample]) -> None:
    """Open every image and mask once; compare mask and image sizes."""
    start = time.perf_counter()
    unreadable: list[tuple[Path, DataError]] = []
    mismatched: list[tuple[Path, Path, tuple[int, int], tuple[int, int]]] = []
    files = 0
    for sample in samples:
        files += 1
        try:
            height, width = read_image(sample.image_path).shape[:2]
        except DataError as err:
            unreadable.append((sample.image_path, err))
            continue
        if sample.mask_path is None:
            continue
        files += 1
        try:
            mask_height, mask_width = read_mask(sample.mask_path).shape[:2]
        except DataError as err:
            unreadable.append((sample.mask_path, err))
            continue
        if (mask_height, mask_width) != (height, width):
            mismatched.append(
                (sample.image_path, sample.mask_path, (width, height), (mask_width, mask_height))
            )
    if unreadable:
        first, error = unreadable[0]
        cause = error.__cause__ or error
        # Pillow's messages often repeat the full path; keep the line short.
        reason = type(cause).__name__ if str(first) in str(cause) else str(cause)
        msg = (
            f"{len(unreadable)} of {files} image and mask files under {str(root)!r} cannot be "
            f"read (first: {_relative(root, first)!r}: {reason}); re-save or remove them"
        )
        raise DataError(msg)
    if mismatched:
        image_path, mask_path, image_size, mask_size = mismatched[0]
        msg = (
            f"{len(mismatched)} masks under {str(root)!r} differ in size from their images "
            f"(first: mask {_relative(root, mask_path)!r} is "
            f"{mask_size[0]}x{mask_size[1]} but image {_relative(root, image_path)!r} is "
            f"{image_size[0]}x{image_size[1]}, width x height); resize the masks to their images"
        )
        raise DataError(msg)
    logger.debug("Opened %d files in %.1f s", files, time.perf_counter() - start)


def _count(total: int, ratio: float) -> int:
    """How many of ``total`` items a ratio takes: at least one and not all, when possible."""
    if total < 2:
        return 0
    return min(max(round(total * ratio), 1), total - 1)


def _take(
    samples: Sequence[Sample], ratio: float, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """Draw ``ratio`` of the samples at random; return (taken, rest), each in input order."""
    chosen = set(rng.permutation(len(samples))[: _count(len(samples), ratio)].tolist())
    taken = [s for i, s in enumerate(samples) if i in chosen]
    rest = [s for i, s in enumerate(samples) if i not in chosen]
    return taken, rest


def _take_stratified(
    samples: Sequence[Sample], ratio: float, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """Like ``_take`` but per source folder, so every defect type lands on both sides."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.source, []).append(sample)
    taken: list[Sample] = []
    rest: list[Sample] = []
    for source in sorted(groups):
        group_taken, group_rest = _take(groups[source], ratio, rng)
        taken.extend(group_taken)
        rest.extend(group_rest)
    if not taken:
        # Every folder holds a single image: stratifying is impossible, split them as a whole.
        return _take(samples, ratio, rng)
    order = {id(s): i for i, s in enumerate(samples)}
    return sorted(taken, key=lambda s: order[id(s)]), sorted(rest, key=lambda s: order[id(s)])


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _describe_dir(root: Path, folder: Path) -> str:
    try:
        relative = folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        relative = str(folder)
    return repr(relative.rstrip("/") + "/") if relative != "." else repr("./")


def _describe_dirs(root: Path, folders: Sequence[Path], limit: int = 4) -> str:
    names = [_describe_dir(root, f) for f in folders]
    if len(names) > limit:
        return f"{', '.join(names[: limit - 1])} and {len(names) - limit + 1} more folders"
    return ", ".join(names)


def _percent(part: int, whole: int) -> str:
    return f"{round(100 * part / whole) if whole else 0} %"


def _summary(split: str, data: AnomalyImageDataset, source: str) -> SplitSummary:
    return SplitSummary(
        split=split,
        images=len(data),
        normal=data.num_normal,
        abnormal=data.num_abnormal,
        masks=data.num_masks,
        source=source,
    )
