"""Reconstruction and distillation models (autoencoder, GANomaly, DRAEM, DSR, STFPM, Reverse Distillation, EfficientAd) for anomaly."""

from __future__ import annotations

__all__: list[str] = []
