"""Resident memory of the running program, for the benchmark scripts (standard library only).

Also imported by ``_anomalib_runner.py``, which runs in Anomalib's own virtual environment.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this program in MiB (VmHWM: since its exec).

    ``ru_maxrss`` would also count the parent's memory at the fork, which Linux keeps across
    exec; it is the fallback only where /proc is missing.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
