"""``Folder``: a datamodule over your own folders of normal and anomalous images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from anomaly import ConfigError

from ._base import FolderLayout, ImageFolderDataModule, check_dir

__all__ = ["Folder"]


class Folder(ImageFolderDataModule):
    """Images in folders: normal ones in one, anomalous ones in others, masks optional.

    Every folder is relative to ``root`` and read recursively; hidden files and folders
    and files that are not images are ignored, and every common image format (PNG, JPEG,
    BMP, TIFF, WebP, ...; grayscale, RGBA or 16-bit) is read as 8-bit RGB.

    Training uses normal images only. Without ``normal_test_dir`` a seeded
    ``test_split_ratio`` share of the normal images is held out for testing, together with
    every anomalous image. Validation images, which set the thresholds, come from the test
    split by default (see ``val_split``).

    Masks are matched to anomalous images by file stem: ``<stem>.png`` or
    ``<stem>_mask.<ext>``, looked for under ``mask_dir`` in a subfolder named like the
    image's folder first, then in ``mask_dir`` itself. With ``mask_dir`` set, every anomalous
    image needs a mask of its own size; without it, ``gt_mask`` is None.

    Example layout, used as ``Folder(root="data", abnormal_dirs=["crack", "hole"],
    mask_dir="masks")``::

        data/good/*.png    data/crack/*.png    data/hole/*.png
        data/masks/crack/*_mask.png            data/masks/hole/*_mask.png

    Args:
        root: Base folder; every other folder is relative to it.
        normal_dir: Folder of normal images.
        abnormal_dirs: Folder, or folders, of anomalous images (test only); None for none.
        mask_dir: Folder of ground-truth masks of the anomalous images; None for none.
        normal_test_dir: Folder of normal test images; None holds out part of
            ``normal_dir`` instead.
        test_split_ratio: Share of normal images held out for testing when
            ``normal_test_dir`` is None; in (0, 1).
        val_split: ``from_test`` (default), ``same_as_test`` or ``from_train``; see
            ``anomaly_data.ValSplitMode``.
        val_split_ratio: Share of the test images (``from_test``) or of the normal training
            images (``from_train``) used for validation; in (0, 1).
        image_size: Side of the square images (or ``[height, width]``).
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the validation, test and predict loaders.
        num_workers: Worker processes per loader; 0 loads in the main process.
        seed: Seed of every random split.

    Raises:
        ConfigError: When an option has a wrong type or value.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        normal_dir: str = "good",
        abnormal_dirs: str | Sequence[str] | None = None,
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
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
            test_split_ratio=test_split_ratio,
            val_split=val_split,
            val_split_ratio=val_split_ratio,
            image_size=image_size,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.root = Path(_path("root", root)).expanduser()
        self.normal_dir = _path("normal_dir", normal_dir)
        if abnormal_dirs is None:
            abnormal: list[str] = []
        elif isinstance(abnormal_dirs, str | os.PathLike):
            abnormal = [_path("abnormal_dirs", abnormal_dirs)]
        elif isinstance(abnormal_dirs, Sequence):
            abnormal = [_path("abnormal_dirs", d) for d in abnormal_dirs]
        else:
            msg = (
                f"data.abnormal_dirs must be a folder name or a list of them, got {abnormal_dirs!r}"
            )
            raise ConfigError(msg)
        self.abnormal_dirs = abnormal
        self.mask_dir = _path("mask_dir", mask_dir) if mask_dir is not None else None
        self.normal_test_dir = (
            _path("normal_test_dir", normal_test_dir) if normal_test_dir is not None else None
        )
        named = [
            ("normal_dir", self.normal_dir),
            *(("abnormal_dirs", d) for d in self.abnormal_dirs),
            *((k, v) for k, v in (("mask_dir", self.mask_dir),) if v is not None),
            *((k, v) for k, v in (("normal_test_dir", self.normal_test_dir),) if v is not None),
        ]
        seen: dict[str, str] = {}
        for option, value in named:
            key = os.path.normpath(value)
            if key in seen:
                msg = (
                    f"folder {value!r} is given as both data.{seen[key]} and data.{option}; "
                    "give each folder one role"
                )
                raise ConfigError(msg)
            seen[key] = option

    def _layout(self) -> FolderLayout:
        check_dir(self.root, "data root", "root")
        layout = FolderLayout(
            root=self.root,
            normal_dir=self.root / self.normal_dir,
            abnormal_dirs=tuple(self.root / d for d in self.abnormal_dirs),
            mask_dir=self.root / self.mask_dir if self.mask_dir is not None else None,
            normal_test_dir=(
                self.root / self.normal_test_dir if self.normal_test_dir is not None else None
            ),
        )
        check_dir(layout.normal_dir, "normal image folder", "normal_dir")
        for folder in layout.abnormal_dirs:
            check_dir(folder, "anomalous image folder", "abnormal_dirs")
        if layout.mask_dir is not None:
            check_dir(layout.mask_dir, "mask folder", "mask_dir")
        if layout.normal_test_dir is not None:
            check_dir(layout.normal_test_dir, "normal test image folder", "normal_test_dir")
        return layout


def _path(option: str, value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        msg = f"data.{option} must be a non-empty folder path, got {value!r}"
        raise ConfigError(msg)
    return value
