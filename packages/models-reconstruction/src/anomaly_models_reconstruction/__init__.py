"""Reconstruction and distillation models for anomaly (to come: autoencoder, DRAEM, STFPM, ...)."""

from __future__ import annotations

__all__: list[str] = []
