"""Process memory: resident set size readings from /proc (Linux), returning freed heap pages (glibc),
and bounding oneDNN's caches."""

from __future__ import annotations

import ctypes
import functools
import os
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


# oneDNN caches every primitive it creates, and PyTorch's oneDNN layer (ideep) keeps its own cache of
# them in each thread. A primitive stays in memory until both caches have dropped it.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_onednn_caches(capacity: int) -> None:
    """Let oneDNN's primitive cache and ideep's cache hold `capacity` entries each, where the
    environment does not already set their sizes.

    Each keeps up to 1,024 entries by default. A packed linear layer makes a primitive for every row
    count of its input, so a prefill worker adds a few with every new prompt length: about 1 MiB a
    request on the embedded model, until both caches are full. The sizes are read when the caches are first
    used, so call this before the first oneDNN operation.
    """
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
