"""Settings of a prefill server and its Ray actors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from snapkv.config import WEIGHT_CHOICES, CompressionConfig
from snapkv.transport import ChannelTLS
from snapkv.wire import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES


def _require(condition: bool, field_name: str, value: object, expected: str) -> None:
    if not condition:
        raise ValueError(f"invalid {field_name}={value!r}: expected {expected}")


@dataclass(frozen=True)
class PrefillConfig:
    """How many actors run prefill, what each may use, and the defaults for requests that set nothing.

    `gpus_per_actor` None means one GPU per actor when the Ray cluster has GPUs, else none.
    `compression` applies to requests without a `compression` field. `actor_start_timeout_s` bounds
    model loading in each actor; the first start of the embedded model converts its weights.
    `weights` "bf16" has each actor's engine pack its layers' weights in bf16 (`Engine(weight_dtype=...)`).
    `decode_tls` opens the channels to decode workers with TLS. The actors read its files, so on a
    multi-node Ray cluster the files must exist at the same paths on every node that runs an actor.
    """

    num_actors: int = 1
    cpus_per_actor: int = 1
    gpus_per_actor: float | None = None
    max_restarts: int = 3
    transfer_timeout_s: float = 60.0
    actor_start_timeout_s: float = 600.0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    cache_dir: Path | None = None
    decode_tls: ChannelTLS | None = None
    # The dtype of prefill's packed linear weights: one of WEIGHT_CHOICES (snapkv.engine.WEIGHT_DTYPES).
    weights: str = "model"

    def __post_init__(self) -> None:
        _require(_is_int(self.num_actors) and self.num_actors >= 1, "num_actors", self.num_actors, "an integer >= 1")
        _require(
            _is_int(self.cpus_per_actor) and self.cpus_per_actor >= 1,
            "cpus_per_actor",
            self.cpus_per_actor,
            "an integer >= 1",
        )
        _require(
            self.gpus_per_actor is None or (_is_number(self.gpus_per_actor) and self.gpus_per_actor >= 0),
            "gpus_per_actor",
            self.gpus_per_actor,
            "None or a number >= 0",
        )
        _require(
            _is_int(self.max_restarts) and self.max_restarts >= -1,
            "max_restarts",
            self.max_restarts,
            "-1 (unlimited) or an integer >= 0",
        )
        for name in ("transfer_timeout_s", "actor_start_timeout_s"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, name, value, "a finite number of seconds > 0")
        _require(self.weights in WEIGHT_CHOICES, "weights", self.weights, f"one of {WEIGHT_CHOICES}")
        _require(
            _is_int(self.chunk_bytes) and 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES,
            "chunk_bytes",
            self.chunk_bytes,
            f"an integer from 1 to {MAX_CHUNK_BYTES}",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
