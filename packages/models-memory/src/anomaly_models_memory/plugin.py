"""Hook implementations of anomaly-models-memory."""

from __future__ import annotations
