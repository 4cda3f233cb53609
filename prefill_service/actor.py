"""The Ray actor that loads the model once and prefills requests one at a time.

Requests and responses cross the Ray boundary as serialized protobuf bytes; no tensor is ever pickled.
Errors cross it as `PrefillError` subclasses, which the server maps to gRPC statuses.
"""

from __future__ import annotations

import logging

import ray
import torch
from google.protobuf.message import DecodeError

from prefill_service.config import PrefillConfig
from prefill_service.errors import InvalidPrefillRequest, PrefillError
from prefill_service.worker import PrefillWorker
from snapkv.memory import limit_onednn_caches
from snapkv.model import resolve_model
from snapkv.proto import serving_pb2 as pb

logger = logging.getLogger(__name__)


class PrefillOutOfMemory(PrefillError):
    """The accelerator ran out of memory for this prompt; a shorter prompt or another worker may fit."""

    code = "RESOURCE_EXHAUSTED"


# The server overrides the resources and max_restarts per pool with `.options()`. Task retries stay
# off: the router decides whether a failed request is tried again, and on which workers.
@ray.remote(max_restarts=3, max_task_retries=0)
class PrefillActor:
    """Load the model named by `model_spec` once, then prefill serialized PrefillRequests."""

    def __init__(self, model_spec: str, config: PrefillConfig):
        # Each new prompt length adds oneDNN primitives: four on the embedded model, one per weight
        # shape of its decoder layers, so 64 entries keep those of the last 16 lengths. Decode workers
        # keep the default sizes, because their row counts are only the batch sizes.
        limit_onednn_caches(64)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's num_cpus. torch.set_num_threads is called as well,
            # because torch may have fixed its thread count before reading that variable.
            torch.set_num_threads(config.cpus_per_actor)
        loaded = resolve_model(model_spec, config.cache_dir)
        loaded.model.to(device)
        self.worker = PrefillWorker.from_model(loaded, config)
        logger.info("prefill actor loaded %s on %s (%d torch threads)", loaded.name, device, torch.get_num_threads())

    def ready(self) -> str:
        """Return the model name; the pool calls this to learn that the model is loaded."""
        return self.worker.engine.name

    def prefill(self, request_bytes: bytes) -> bytes:
        """Prefill one serialized PrefillRequest; return the serialized PrefillResponse (without `queue_s`)."""
        try:
            message = pb.PrefillRequest.FromString(request_bytes)
        except DecodeError as error:
            raise InvalidPrefillRequest(f"invalid PrefillRequest bytes: {error}") from None

        context = ray.get_runtime_context()
        try:
            response = self.worker.run(message, context.is_canceled)
        except torch.OutOfMemoryError as error:
            raise PrefillOutOfMemory(f"request {message.request_id}: out of accelerator memory: {error}") from None
        return response.SerializeToString()
