"""Ray reads its loopback-only setting when it is first imported, so it is applied before any test imports ray."""

from prefill_service.local_ray import apply_local_ray_environment

apply_local_ray_environment()
