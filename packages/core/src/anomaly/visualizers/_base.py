"""``Visualizer``: the base class of every visualizer, and safe output file names."""

from __future__ import annotations

import abc
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar

from anomaly._errors import DataError

if TYPE_CHECKING:
    from anomaly._batch import Batch

__all__ = ["Visualizer"]

# Letters, digits (any script), '_', '.' and '-' survive; every other run becomes one '_'.
_UNSAFE = re.compile(r"[^\w.-]+")
_MAX_PART = 100


def _safe_part(part: str) -> str:
    """Return ``part`` usable as one file-name component, or '' when nothing is left.

    Leading dots go (no hidden files, no ``..``), trailing dots too (Windows drops them).
    """
    return _UNSAFE.sub("_", part).strip(".")[:_MAX_PART].strip(".")


class Visualizer(abc.ABC):
    """Write one picture per image of each batch under ``output_dir``.

    File names derive from each image's path as ``<parent folder>/<stem><suffix>`` (for
    ``data/test/crack/000.png``: ``crack/000.png``). Every component is sanitised, so no
    name escapes ``output_dir`` whatever the path holds (``..``, separators, odd
    characters); names taken earlier by this visualizer get ``_1``, ``_2``, ... appended,
    and in-memory images (empty path) are numbered ``image_000000``, ...

    Subclasses set ``name`` and ``suffix``, take their options as keyword arguments
    (invalid values raise ``ConfigError``) and implement ``visualize``.

    Args:
        output_dir: Folder to write into; created on first write.
    """

    name: ClassVar[str]
    suffix: ClassVar[str] = ".png"

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self._taken: set[str] = set()
        self._unnamed = 0

    @abc.abstractmethod
    def visualize(self, batch: Batch) -> list[Path]:
        """Write one file per image of a post-processed ``batch``.

        Returns:
            The written paths, in batch order.
        """

    def output_path(self, image_path: str) -> Path:
        """Reserve and return the output file for the image at ``image_path``.

        Raises:
            DataError: When the resulting path would leave ``output_dir``; sanitising makes
                that impossible short of a symbolic link inside ``output_dir``.
        """
        # Backslashes are separators in Windows paths; treat both spellings alike.
        source = PurePosixPath(image_path.replace("\\", "/"))
        stem = _safe_part(source.stem) if image_path else ""
        if not stem:
            stem = f"image_{self._unnamed:06d}"
            self._unnamed += 1
        folder = _safe_part(source.parent.name)
        relative = f"{folder}/{stem}" if folder else stem
        candidate, number = relative, 0
        # Case-insensitive comparison: 'A.png' and 'a.png' are one file on some systems.
        while candidate.lower() in self._taken:
            number += 1
            candidate = f"{relative}_{number}"
        self._taken.add(candidate.lower())
        path = self.output_dir / f"{candidate}{self.suffix}"
        if not path.resolve().is_relative_to(self.output_dir.resolve()):
            msg = (
                f"visualizer output {str(path)!r} for image {image_path!r} leaves "
                f"{str(self.output_dir)!r}; remove symbolic links from the output folder"
            )
            raise DataError(msg)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output_dir={str(self.output_dir)!r})"
