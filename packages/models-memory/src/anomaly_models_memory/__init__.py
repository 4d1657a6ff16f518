"""Memory-bank and feature-statistics models for anomaly: PatchCore, PaDiM."""

from __future__ import annotations

__all__: list[str] = []
