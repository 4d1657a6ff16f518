"""``python -m anomaly``: the same as the ``anomaly`` command."""

from __future__ import annotations

from anomaly._cli import _entry

if __name__ == "__main__":
    _entry()
