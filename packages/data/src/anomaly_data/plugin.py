"""Hook implementations of anomaly-data."""

from __future__ import annotations
