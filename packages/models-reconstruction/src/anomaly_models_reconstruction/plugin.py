"""Hook implementations of anomaly-models-reconstruction; the package registers no components yet."""

from __future__ import annotations
