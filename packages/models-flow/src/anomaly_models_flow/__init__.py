"""Normalizing-flow models (FastFlow, CFlow, CS-Flow, U-Flow) for anomaly."""

from __future__ import annotations

__all__: list[str] = []
