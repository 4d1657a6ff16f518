"""Exporters, inferencers and serving for anomaly."""

from __future__ import annotations

__all__: list[str] = []
