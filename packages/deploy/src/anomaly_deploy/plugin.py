"""Hook implementations of anomaly-deploy; the package registers no components yet."""

from __future__ import annotations
