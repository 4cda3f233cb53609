"""Continuous batching: every active sequence advances in one batched forward step per token.

Sequences join and leave only at step boundaries. A join appends rows to the `BatchCache` (one copy of
the new prompt caches); a leave drops rows. The loop runs in its own thread so that the gRPC event loop
stays responsive while torch computes. Results reach each request through its `sink` callback, which
must be thread-safe (the server passes `loop.call_soon_threadsafe`-based callbacks).

Limitations: joining reallocates the batch's tensors (a copy of the resident KV), which a paged layout
would avoid; the batch size is bounded by `max_batch_size` and sequences beyond it wait in order.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from snapkv.engine import Engine
from snapkv.kv_cache import BatchCache, PromptCache
from snapkv.memory import release_free_heap
from snapkv.sequence import SequenceState

logger = logging.getLogger(__name__)


@dataclass
class StepEvent:
    """One generated token for one sequence; `finish_reason` is set on its last event."""

    token_id: int
    text: str
    finish_reason: str | None


@dataclass
class DecodeJob:
    """A sequence handed to the scheduler: its prompt cache and its generation state."""

    handle: str
    request_id: str
    cache: PromptCache
    sequence: SequenceState
    sink: Callable[[StepEvent | BaseException], None]
    on_done: Callable[["DecodeJob"], None] = lambda job: None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.monotonic)


class DecodeScheduler:
    """Runs the decode loop over a changing set of sequences."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 32,
        on_step: Callable[[int, float], None] | None = None,
        num_threads: int | None = None,
    ):
        """`num_threads` sets torch's intra-op threads of the decode loop's thread; None keeps torch's default."""
        if max_batch_size < 1:
            raise ValueError(f"invalid max_batch_size={max_batch_size}: expected >= 1")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"invalid num_threads={num_threads}: expected >= 1")
        self.engine = engine
        self.num_threads = num_threads
        self.max_batch_size = max_batch_size
        self.on_step = on_step or (lambda batch_size, seconds: None)
        self._pending: collections.deque[DecodeJob] = collections.deque()
        self._active: list[DecodeJob] = []
        self._cache: BatchCache | None = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        # Set once the loop takes sequences: after `warm_up_decode` when the engine compiles its step.
        self.ready = threading.Event()
        self.warm_up_error: BaseException | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, job: DecodeJob) -> None:
        with self._wake:
            self._pending.append(job)
            self._wake.notify()

    def cancel(self, job: DecodeJob) -> None:
        """Stop a sequence; its rows and memory are released at the next step boundary."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def _run(self) -> None:
        if self.num_threads is not None:
            # The thread count is kept per thread by OpenMP, so this thread sets its own.
            torch.set_num_threads(self.num_threads)
        if self.engine.compile_decode:
            # Compile in this thread, because the compiler plans its parallel loops for the calling
            # thread's thread count.
            try:
                self.engine.warm_up_decode(self.max_batch_size)
                # Compiling leaves freed memory in this thread's heap: 700 to 800 MiB on the embedded model.
                released = release_free_heap()
                if released is not None:
                    logger.info("returned %d MiB of freed heap memory after compiling", released >> 20)
            except Exception as error:  # serve() raises it and does not start the server
                logger.error("decode step warm-up failed on model %s: %s", self.engine.name, error)
                self.warm_up_error = error
                self.ready.set()
                return
        self.ready.set()
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._active:
                    self._wake.wait()
                if self._stopping:
                    break
            self._admit()
            self._retire()
            if self._active:
                self._step()
                self._retire()
        self._fail_all(RuntimeError("decode worker is shutting down"))

    def _admit(self) -> None:
        with self._wake:
            room = self.max_batch_size - len(self._active)
            joining = []
            while self._pending and len(joining) < room:
                job = self._pending.popleft()
                if job.cancelled:
                    job.on_done(job)
                else:
                    joining.append(job)
        if not joining:
            return

        caches = [job.cache for job in joining]
        max_new = max(job.sequence.sampling.max_tokens for job in joining)
        if self._cache is None:
            self._cache = BatchCache(caches, max_new, self.engine.kv_dtype)
        else:
            self._cache.add_rows(caches, max_new)
        self._active.extend(joining)
        logger.debug("admitted %d sequences, batch size %d", len(joining), len(self._active))

    def _step(self) -> None:
        started = time.perf_counter()
        tokens = torch.tensor([job.sequence.last_token for job in self._active])
        try:
            logits = self.engine.decode_step(self._cache, tokens)
        except Exception as error:  # noqa: BLE001 - every active request must learn of the failure
            logger.exception("decode step failed for %d sequences", len(self._active))
            self._fail_all(error)
            return

        for row, job in enumerate(self._active):
            if job.cancelled:
                continue
            sequence = job.sequence
            token = sequence.sample(logits[row])
            text = sequence.accept(token)
            job.sink(StepEvent(token, text, sequence.finish_reason))
        self.on_step(len(self._active), time.perf_counter() - started)

    def _retire(self) -> None:
        keep = [row for row, job in enumerate(self._active) if not (job.cancelled or job.sequence.finished)]
        if len(keep) == len(self._active):
            return
        leaving = [job for row, job in enumerate(self._active) if row not in set(keep)]
        self._active = [self._active[row] for row in keep]
        if self._active:
            self._cache.select_rows(keep)
        else:
            self._cache = None
        for job in leaving:
            job.on_done(job)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            jobs = self._active + list(self._pending)
            self._pending.clear()
        self._active = []
        self._cache = None
        for job in jobs:
            job.sink(error)
            job.on_done(job)
