"""Datamodules for anomaly: folder, MVTec AD and the built-in demo dataset."""

from __future__ import annotations

__all__: list[str] = []
