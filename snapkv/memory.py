"""Process memory: resident set size readings from /proc (Linux), and returning freed heap pages (glibc)."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    # The process's own symbols include the C library's. A lookup, unlike find_library, starts no subprocess.
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_heap() -> int | None:
    """Give the C heap's free pages back to the operating system with glibc's `malloc_trim`, and
    return by how many bytes the resident set shrank.

    On its own, glibc gives back only large blocks and free space at a heap's end. Freed blocks in
    the middle of a heap stay resident. Return None, doing nothing, where the C library has no `malloc_trim` (musl, macOS).
    """
    trim = _malloc_trim()
    if trim is None:
        return None
    before = resident_bytes()
    trim(0)
    return before - resident_bytes()
