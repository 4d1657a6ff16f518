"""Hook implementations of anomaly-models-reconstruction; it registers nothing yet."""

from __future__ import annotations
