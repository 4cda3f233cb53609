"""A pool of prefill actors: the least busy one takes each request; dead ones are routed around and replaced.

Each actor runs one request at a time, and Ray queues the others in front of it, so the pool sends a
request to the ready actor with the fewest requests in flight. An actor that fails a request with
`RayActorError` leaves the rotation until its `ready` method succeeds again: Ray restarts it up to
`max_restarts` times, reloading the model. One that is dead for good, after serving before, is
replaced by a new actor. One that never finished loading is left out, so a model that cannot load
does not restart forever.

Limitations: the pool learns of a death only from a failed request, so a request sent to an actor
that died while idle fails with UNAVAILABLE (the router retries it elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import grpc
import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, OutOfMemoryError, RayActorError, RayError, RayTaskError, TaskCancelledError

from prefill_service.actor import PrefillActor
from prefill_service.config import PrefillConfig
from prefill_service.errors import DecodeTransferError, PrefillError
from prefill_service.metrics import PrefillMetrics
from snapkv.proto import serving_pb2 as pb

logger = logging.getLogger(__name__)

RECOVERY_MIN_DELAY_S = 0.2
RECOVERY_MAX_DELAY_S = 5.0


@dataclass
class ActorSlot:
    """One place in the pool and the actor that currently fills it."""

    index: int
    actor: ActorHandle
    in_flight: int = 0
    ready: bool = False
    served: bool = False  # loaded the model at least once, so a later death is not a start-up failure


class RequestFailed(Exception):
    """A request that failed; `code` is the gRPC status and `failed_peer` names the side that failed.

    `failed_peer` is "prefill" for this server and its actors, or "decode <host:port>" for the decode
    worker that rejected the cache.
    """

    def __init__(self, code: grpc.StatusCode, message: str, failed_peer: str = "prefill"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.failed_peer = failed_peer


def pick_slot(slots: list[ActorSlot]) -> ActorSlot | None:
    """Return the ready slot with the fewest requests in flight, the lowest index on ties; None if none is ready."""
    ready = [slot for slot in slots if slot.ready]
    return min(ready, key=lambda slot: (slot.in_flight, slot.index), default=None)


class ActorPool:
    """`config.num_actors` PrefillActors, each loading `model_spec` with `num_gpus` GPUs.

    `on_change` is called whenever an actor leaves or rejoins the rotation.
    """

    def __init__(
        self,
        model_spec: str,
        config: PrefillConfig,
        num_gpus: float,
        metrics: PrefillMetrics,
        on_change: Callable[[], None] | None = None,
    ):
        self.model_spec = model_spec
        self.config = config
        self.num_gpus = num_gpus
        self.metrics = metrics
        self.on_change = on_change
        self.slots = [ActorSlot(index, self._create_actor()) for index in range(config.num_actors)]
        self._recoveries: set[asyncio.Task] = set()
        self._closed = False

    @property
    def num_ready(self) -> int:
        return sum(slot.ready for slot in self.slots)

    def _create_actor(self) -> ActorHandle:
        return PrefillActor.options(
            num_cpus=self.config.cpus_per_actor,
            num_gpus=self.num_gpus,
            max_restarts=self.config.max_restarts,
            max_task_retries=0,
        ).remote(self.model_spec, self.config)

    async def start(self) -> None:
        """Wait until every actor has loaded the model; raise RuntimeError if one fails or time runs out."""
        timeout_s = self.config.actor_start_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(*(slot.actor.ready.remote() for slot in self.slots)), timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"prefill actors did not load {self.model_spec} within {timeout_s:.0f} s; check that the Ray cluster "
                f"has {self.config.cpus_per_actor} free CPUs and {self.num_gpus} GPUs for each of {len(self.slots)} actors"
            ) from None
        except RayError as error:
            raise RuntimeError(f"a prefill actor failed to load {self.model_spec}: {error}") from error
        for slot in self.slots:
            slot.ready = slot.served = True
        self._notify()

    async def prefill(self, request_bytes: bytes) -> pb.PrefillResponse:
        """Run one serialized PrefillRequest on the least busy actor; raise RequestFailed with the status."""
        slot = pick_slot(self.slots)
        if slot is None:
            raise RequestFailed(
                grpc.StatusCode.UNAVAILABLE,
                "no prefill actor is ready: all are restarting or dead; retry on another prefill server",
            )
        actor = slot.actor
        slot.in_flight += 1
        ref = actor.prefill.remote(request_bytes)
        try:
            response = pb.PrefillResponse.FromString(await ref)
            self.metrics.observe_actor(slot.index, response)
            return response
        except asyncio.CancelledError:
            # Drops the task if it is still queued; a running one stops at its next cancellation check.
            ray.cancel(ref)
            raise
        except RayTaskError as error:
            raise task_failure(error) from error
        except RayActorError as error:
            self._lose(slot, actor, error)
            raise RequestFailed(
                grpc.StatusCode.UNAVAILABLE, f"prefill actor {slot.index} died or is restarting: {error}"
            ) from None
        except TaskCancelledError:
            raise RequestFailed(grpc.StatusCode.CANCELLED, "the prefill task was cancelled") from None
        except OutOfMemoryError as error:
            message = f"Ray stopped the prefill task for lack of memory: {error}"
            raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, message) from None
        except RayError as error:
            raise RequestFailed(grpc.StatusCode.INTERNAL, f"Ray failed to run the prefill task: {error}") from None
        finally:
            slot.in_flight -= 1

    def _lose(self, slot: ActorSlot, actor: ActorHandle, error: RayActorError) -> None:
        """Take the slot out of the rotation, once per failure, and start watching for its recovery."""
        if slot.actor is not actor or not slot.ready:
            return
        slot.ready = False
        self.metrics.actor_restarts.inc()
        logger.warning("prefill actor %d left the rotation: %s", slot.index, _first_line(error))
        self._notify()
        task = asyncio.create_task(self._recover(slot))
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recover(self, slot: ActorSlot) -> None:
        delay_s = RECOVERY_MIN_DELAY_S
        while not self._closed:
            actor = slot.actor
            try:
                await asyncio.wait_for(actor.ready.remote(), self.config.actor_start_timeout_s)
            except (ActorUnavailableError, asyncio.TimeoutError):
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, RECOVERY_MAX_DELAY_S)
                continue
            except RayActorError as error:
                if not slot.served:
                    logger.error(
                        "prefill actor %d failed to load %s; leaving it out: %s", slot.index, self.model_spec, error
                    )
                    return
                logger.warning("prefill actor %d is dead (%s); starting a replacement", slot.index, _first_line(error))
                slot.actor = self._create_actor()
                slot.served = False
                continue
            slot.ready = slot.served = True
            logger.info("prefill actor %d is ready again", slot.index)
            self._notify()
            return

    def _notify(self) -> None:
        self.metrics.ready_actors.set(self.num_ready)
        if self.on_change is not None:
            self.on_change()

    async def close(self) -> None:
        """Stop watching for recoveries and kill every actor (without restart)."""
        self._closed = True
        for task in list(self._recoveries):
            task.cancel()
        for slot in self.slots:
            slot.ready = False
            ray.kill(slot.actor, no_restart=True)


def task_failure(error: RayTaskError) -> RequestFailed:
    """Translate an exception raised inside PrefillActor.prefill into the status for the reply."""
    cause = error.cause
    if isinstance(cause, DecodeTransferError):
        return RequestFailed(grpc.StatusCode[cause.code], str(cause), f"decode {cause.decode_address}")
    if isinstance(cause, PrefillError):
        return RequestFailed(grpc.StatusCode[cause.code], str(cause))
    return RequestFailed(grpc.StatusCode.INTERNAL, f"prefill failed with {type(cause).__name__}: {cause}")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
