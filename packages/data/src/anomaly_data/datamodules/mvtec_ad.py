"""``MvtecAd``: one category of MVTec AD, or of any dataset laid out the same way."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from anomaly import ConfigError, DataError
from anomaly_data.datasets.download import (
    MVTEC_AD_CATEGORIES,
    MVTEC_AD_DOWNLOAD,
    DownloadInfo,
    download_and_extract,
)

from ._base import FolderLayout, ImageFolderDataModule, check_dir

__all__ = ["MvtecAd"]

logger = logging.getLogger(__name__)


class MvtecAd(ImageFolderDataModule):
    """One category of a dataset in the MVTec AD layout.

    ::

        ROOT/CATEGORY/train/good/*            normal training images
        ROOT/CATEGORY/test/good/*             normal test images
        ROOT/CATEGORY/test/<defect>/*         anomalous test images, one folder per defect
        ROOT/CATEGORY/ground_truth/<defect>/<stem>_mask.png

    Any image format is read (MTD, for one, ships JPEG). Without ``ground_truth`` the data
    has no masks. Nothing is downloaded unless ``download=True``; then a missing category is
    fetched from the official MVTec AD archive (4.9 GB, all 15 categories, licensed CC
    BY-NC-SA 4.0), or from ``download_url``, and checked against its SHA-256 first.

    Args:
        root: Folder holding the category folders.
        category: The category folder, e.g. ``bottle``.
        download: Download and extract the archive when the category is missing.
        download_url: Archive to download instead of the official one (a mirror, or another
            dataset in this layout); needs ``download_sha256``.
        download_sha256: SHA-256 of the archive at ``download_url``.
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
        root: str | os.PathLike[str] = "./datasets/mvtec_ad",
        category: str = "bottle",
        *,
        download: bool = False,
        download_url: str | None = None,
        download_sha256: str | None = None,
        val_split: str = "from_test",
        val_split_ratio: float = 0.5,
        image_size: int | Sequence[int] = 256,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            val_split=val_split,
            val_split_ratio=val_split_ratio,
            image_size=image_size,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        if isinstance(root, os.PathLike):
            root = os.fspath(root)
        if not isinstance(root, str) or not root.strip():
            msg = f"data.root must be a non-empty folder path, got {root!r}"
            raise ConfigError(msg)
        if (
            not isinstance(category, str)
            or not category.strip()
            or category.startswith(".")
            or any(sep in category for sep in ("/", "\\"))
        ):
            msg = f"data.category must be a plain folder name such as 'bottle', got {category!r}"
            raise ConfigError(msg)
        if not isinstance(download, bool):
            msg = f"data.download must be true or false, got {download!r}"
            raise ConfigError(msg)
        if (download_url is None) != (download_sha256 is None):
            msg = (
                "data.download_url and data.download_sha256 go together, got "
                f"url={download_url!r} and sha256={download_sha256!r}; give both or neither"
            )
            raise ConfigError(msg)
        if download_sha256 is not None and (
            len(download_sha256) != 64
            or any(c not in "0123456789abcdef" for c in download_sha256.lower())
        ):
            msg = f"data.download_sha256 must be 64 hex digits, got {download_sha256!r}"
            raise ConfigError(msg)
        self.root = Path(root).expanduser()
        self.category = category
        self.download = download
        self.download_info = (
            DownloadInfo(name="dataset archive", url=download_url, sha256=download_sha256)
            if download_url is not None and download_sha256 is not None
            else MVTEC_AD_DOWNLOAD
        )
        if download and self.download_info is MVTEC_AD_DOWNLOAD:
            self._check_official_category()

    def _check_official_category(self) -> None:
        if self.category in MVTEC_AD_CATEGORIES:
            return
        close = difflib.get_close_matches(self.category, MVTEC_AD_CATEGORIES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        msg = (
            f"MVTec AD has no category {self.category!r}; {hint}choose one of "
            f"{', '.join(MVTEC_AD_CATEGORIES)}"
        )
        raise ConfigError(msg)

    @property
    def category_dir(self) -> Path:
        """The category folder, ``root / category``."""
        return self.root / self.category

    def prepare_data(self) -> None:
        """Download the category if it is missing and ``download`` is on (rank 0 only)."""
        self._fetch()

    def _fetch(self) -> None:
        if self.category_dir.is_dir() or not self.download:
            return
        download_and_extract(self.download_info, self.root)
        if not self.category_dir.is_dir():
            msg = (
                f"the archive from {self.download_info.url!r} has no category "
                f"{self.category!r}; it holds {', '.join(_categories(self.root)) or 'none'}"
            )
            raise DataError(msg)

    def _layout(self) -> FolderLayout:
        self._fetch()
        if not self.category_dir.is_dir():
            self._missing_category()
        category_dir = self.category_dir
        train_good = category_dir / "train" / "good"
        test_dir = category_dir / "test"
        check_dir(train_good, "training folder", "category")
        check_dir(test_dir / "good", "normal test folder", "category")
        defects = tuple(
            test_dir / name
            for name in sorted(os.listdir(test_dir))
            if name != "good" and not name.startswith(".") and (test_dir / name).is_dir()
        )
        masks = category_dir / "ground_truth"
        return FolderLayout(
            root=category_dir,
            normal_dir=train_good,
            abnormal_dirs=defects,
            mask_dir=masks if masks.is_dir() else None,
            normal_test_dir=test_dir / "good",
        )

    def _missing_category(self) -> None:
        if not self.root.is_dir():
            msg = (
                f"dataset root {str(self.root)!r} does not exist; check data.root, or set "
                "data.download=true to download MVTec AD there"
            )
            raise DataError(msg)
        found = _categories(self.root)
        close = difflib.get_close_matches(self.category, found, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = f"{str(self.root)!r} holds {', '.join(found) if found else 'no categories'}"
        msg = (
            f"category {self.category!r} does not exist; {hint}{listing}; check data.category, "
            "or set data.download=true to download it"
        )
        raise DataError(msg)


def _categories(root: Path) -> list[str]:
    """The category folders under ``root``: those with a ``train`` folder."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "train").is_dir()
    )
