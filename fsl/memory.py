"""Resident memory of this process: now and at its peak (for sizing devices and servers)."""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_mb", "rss_mb"]


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``VmHWM``; ``getrusage`` where there is no /proc)."""
    v = _proc_status_mb("VmHWM")
    if v is not None:
        return v
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    v = _proc_status_mb("VmRSS")
    return v if v is not None else peak_rss_mb()
