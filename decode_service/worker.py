"""The decode worker's state outside the batch: KV memory reservations and loaded caches awaiting a stream.

Every cache is reserved before its transfer is accepted and released exactly once: when its sequence
finishes, is cancelled or fails, when its transfer breaks off, when the router releases a handle it will
not stream, or when no client streams its handle within the lease. All methods are safe to call from the gRPC event loop and from the decode thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from snapkv.wire import ReceivedKV

logger = logging.getLogger(__name__)


@dataclass
class LoadedKV:
    """A received cache waiting for `Stream`, with the memory reserved for it."""

    handle: str
    received: ReceivedKV
    reserved_bytes: int
    expires_at: float


class KVMemory:
    """Reservations of KV memory against a fixed budget, in bytes."""

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"invalid kv budget_bytes={budget_bytes}: expected > 0")
        self.budget_bytes = budget_bytes
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def try_reserve(self, num_bytes: int) -> bool:
        """Reserve `num_bytes` if they fit; return False (reserving nothing) when they do not."""
        with self._lock:
            if self._reserved + num_bytes > self.budget_bytes:
                return False
            self._reserved += num_bytes
            return True

    def release(self, num_bytes: int) -> None:
        with self._lock:
            if num_bytes > self._reserved:
                raise RuntimeError(f"releasing {num_bytes} bytes but only {self._reserved} are reserved")
            self._reserved -= num_bytes


class LoadedCaches:
    """Caches that finished loading and wait for a `Stream` call, each under a lease."""

    def __init__(self, memory: KVMemory, lease_s: float):
        self.memory = memory
        self.lease_s = lease_s
        self._entries: dict[str, LoadedKV] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, received: ReceivedKV, reserved_bytes: int) -> LoadedKV:
        entry = LoadedKV(uuid.uuid4().hex, received, reserved_bytes, time.monotonic() + self.lease_s)
        with self._lock:
            self._entries[entry.handle] = entry
        return entry

    def claim(self, handle: str) -> LoadedKV | None:
        """Take the cache out of the waiting set; None when the handle is unknown, claimed or expired."""
        with self._lock:
            return self._entries.pop(handle, None)

    def release(self, handle: str) -> LoadedKV | None:
        """Free a waiting cache and return it; None when the handle is unknown, claimed or expired."""
        entry = self.claim(handle)
        if entry is not None:
            self.memory.release(entry.reserved_bytes)
        return entry

    def expire(self, now: float | None = None) -> list[LoadedKV]:
        """Free every cache whose lease has run out; return them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [entry for entry in self._entries.values() if entry.expires_at <= now]
            for entry in expired:
                del self._entries[entry.handle]
        for entry in expired:
            self.memory.release(entry.reserved_bytes)
            logger.warning(
                "lease expired for request %s (handle %s): no Stream call within %.1f s, freed %d bytes",
                entry.received.request_id,
                entry.handle,
                self.lease_s,
                entry.reserved_bytes,
            )
        return expired

    def release_all(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            self.memory.release(entry.reserved_bytes)
