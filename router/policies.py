"""Routing policies: pure functions that pick one worker among the healthy candidates.

Each policy takes the candidates in a stable order (the registry's) and returns one of them, or None
when there is none. They keep no state of their own: round robin takes its counter from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class WorkerLoad:
    """Load of one worker as the router sees it when it routes a request."""

    address: str
    outstanding: int = 0  # requests the router has sent and not yet seen finish
    kv_free_bytes: int = 0  # decode workers only: budget minus resident KV, from their last Status


def round_robin(candidates: Sequence[WorkerLoad], counter: int) -> WorkerLoad | None:
    """Pick the candidate at `counter` modulo their number."""
    if not candidates:
        return None
    return candidates[counter % len(candidates)]


def least_loaded(candidates: Sequence[WorkerLoad], counter: int) -> WorkerLoad | None:
    """Pick the candidate with the fewest outstanding requests; ties rotate with `counter`."""
    if not candidates:
        return None
    fewest = min(c.outstanding for c in candidates)
    tied = [c for c in candidates if c.outstanding == fewest]
    return tied[counter % len(tied)]


def kv_aware(candidates: Sequence[WorkerLoad], counter: int) -> WorkerLoad | None:
    """Pick the candidate with the most free KV memory; ties go to fewer outstanding, then rotate."""
    if not candidates:
        return None
    max_free = max(c.kv_free_bytes for c in candidates)
    tied = [c for c in candidates if c.kv_free_bytes == max_free]
    return least_loaded(tied, counter)


POLICIES: dict[str, Callable[[Sequence[WorkerLoad], int], WorkerLoad | None]] = {
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "kv_aware": kv_aware,
}
