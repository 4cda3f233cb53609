"""Process memory readings from /proc (Linux): current and peak resident set size."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{_STATUS} has no {field} line")


def resident_bytes() -> int:
    """Return the current resident set size of this process."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """Return the peak resident set size since the process started or the last `reset_peak()`."""
    return _status_bytes("VmHWM")


def reset_peak() -> None:
    """Reset the peak resident set size to the current one (Linux 4.0 and newer)."""
    _CLEAR_REFS.write_text("5")
