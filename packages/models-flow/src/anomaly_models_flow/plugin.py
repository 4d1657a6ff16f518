"""Hook implementations of anomaly-models-flow; the package registers no components yet."""

from __future__ import annotations
