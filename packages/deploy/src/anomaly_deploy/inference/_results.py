"""Write predictions to a folder: predictions.csv, predictions.json and one PNG per image."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path, PurePosixPath
from types import TracebackType

from PIL import Image

from anomaly_deploy.inference._base import Prediction
from anomaly_deploy.inference._visualize import render

__all__ = ["PredictionWriter"]

# Letters, digits (any script), '_', '.' and '-' survive; every other run becomes one '_'.
_UNSAFE = re.compile(r"[^\w.-]+")
_MAX_PART = 100
COLUMNS = ("image_path", "pred_score", "pred_label")


def _safe_part(part: str) -> str:
    """Return ``part`` usable as one file-name component; '' when nothing is left."""
    return _UNSAFE.sub("_", part).strip(".")[:_MAX_PART].strip(".")


class PredictionWriter:
    """Collect predictions into ``folder``: one PNG each under ``images/``, then the tables.

    Picture names follow the source: ``<parent folder>/<stem>.png`` for files (sanitised,
    so no name leaves the folder), ``frame_12.png`` for frames; clashes get ``_1``, ``_2``.
    ``close()`` (or leaving the ``with`` block without an error) writes ``predictions.csv``
    and ``predictions.json`` with one row per image: ``image_path`` (the source),
    ``pred_score`` and ``pred_label``.

    Args:
        folder: Where to write; created when missing.
        images: Write one PNG per prediction (see ``render``).
        alpha: Weight of the heat map in the overlay.
    """

    def __init__(
        self, folder: str | os.PathLike[str], *, images: bool = True, alpha: float = 0.5
    ) -> None:
        self.folder = Path(folder)
        self.images = images
        self.alpha = alpha
        self.rows: list[dict[str, object]] = []
        self.written: list[Path] = []
        self._taken: set[str] = set()

    def write(self, prediction: Prediction) -> Path | None:
        """Record one prediction and write its picture; return the picture's path."""
        self.rows.append(
            {
                "image_path": prediction.source,
                "pred_score": round(prediction.pred_score, 6),
                "pred_label": prediction.pred_label,
            }
        )
        if not self.images:
            return None
        path = self.folder / "images" / f"{self._name(prediction.source)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(prediction, alpha=self.alpha)).save(path, format="PNG")
        self.written.append(path)
        return path

    def close(self) -> None:
        """Write ``predictions.csv`` and ``predictions.json``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for row in self.rows:
                writer.writerow([row["image_path"], f"{row['pred_score']:.6f}", row["pred_label"]])
        (self.folder / "predictions.json").write_text(
            json.dumps(self.rows, indent=2) + "\n", encoding="utf-8"
        )

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()

    def _name(self, source: str) -> str:
        posix = PurePosixPath(source.replace("\\", "/"))
        stem = _safe_part(posix.stem)
        folder = _safe_part(posix.parent.name)
        relative = f"{folder}/{stem}" if folder else (stem or "image")
        candidate, number = relative, 0
        # Case-insensitive: 'A.png' and 'a.png' are one file on some systems.
        while candidate.lower() in self._taken:
            number += 1
            candidate = f"{relative}_{number}"
        self._taken.add(candidate.lower())
        return candidate
