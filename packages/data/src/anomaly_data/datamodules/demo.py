"""``Demo``: the built-in dataset, generated on first use from bundled texture photographs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from anomaly import ConfigError
from anomaly_data.datasets.demo import (
    DEMO_CATEGORIES,
    DEMO_VERSION,
    cache_dir,
    ensure_demo_dataset,
)

from ._base import FolderLayout
from .mvtec_ad import MvtecAd

__all__ = ["Demo"]


class Demo(MvtecAd):
    """A small texture-inspection dataset that needs no download.

    On first use one category is generated (a second or two) from a photograph bundled
    with scikit-image: 60 normal training crops, 20 normal test crops and 10 test crops for
    each of three synthetic defects (``scratch``, ``stain``, ``patch``), 256 x 256, with masks.
    It is cached in the MVTec AD layout under ``<cache>/demo/<version>/<category>``, where
    ``<cache>`` is ``$ANOMALY_CACHE_DIR``, ``$XDG_CACHE_HOME/anomaly`` or ``~/.cache/anomaly``,
    and then read exactly like ``MvtecAd``. Generation is deterministic and atomic.

    Args:
        category: ``brick`` (default), ``grass`` or ``gravel``.
        root: Cache folder to use instead of the default one.
        val_split: ``from_test`` (default), ``same_as_test`` or ``from_train``.
        val_split_ratio: Share of the test (or training) images used for validation.
        image_size: Side of the square images (or ``[height, width]``).
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the validation, test and predict loaders.
        num_workers: Worker processes per loader; 0 loads in the main process.
        seed: Seed of every random split (the images themselves never change).

    Raises:
        ConfigError: When an option has a wrong type or value.
    """

    def __init__(
        self,
        category: str = "brick",
        root: str | os.PathLike[str] | None = None,
        *,
        val_split: str = "from_test",
        val_split_ratio: float = 0.5,
        image_size: int | Sequence[int] = 256,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if category not in DEMO_CATEGORIES:
            msg = f"unknown demo category {category!r}; choose one of {', '.join(DEMO_CATEGORIES)}"
            raise ConfigError(msg)
        if root is not None and (not isinstance(root, str | os.PathLike) or not str(root)):
            msg = f"data.root must be a folder path or null, got {root!r}"
            raise ConfigError(msg)
        self.cache_root = Path(root).expanduser() if root is not None else cache_dir()
        super().__init__(
            root=self.cache_root / "demo" / DEMO_VERSION,
            category=category,
            val_split=val_split,
            val_split_ratio=val_split_ratio,
            image_size=image_size,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )

    def prepare_data(self) -> None:
        """Generate the category if it is not cached yet (rank 0 only)."""
        ensure_demo_dataset(self.category, self.cache_root)

    def _layout(self) -> FolderLayout:
        ensure_demo_dataset(self.category, self.cache_root)
        return super()._layout()
