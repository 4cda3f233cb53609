"""Start a single-node Ray for the prefill actors that listens and connects on loopback only.

`ray.init(_node_ip_address="127.0.0.1")` alone is not enough in Ray 2.60: on Linux Ray swaps a
loopback address for the machine's routable IP (`ray._private.services.resolve_ip_for_localhost`),
and its raylet, GCS and workers then listen on every interface. Ray keeps loopback only when
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its local-only mode, which Ray reads once, when Python first
imports it. So a program that starts a local Ray must apply `LOCAL_RAY_ENVIRONMENT` before anything
imports ray; this module imports ray only inside `init_local_ray` for that reason. The same mapping
turns off Ray's usage statistics, which Ray otherwise sends to usage-stats.ray.io.

Do not apply it in a process that joins a multi-node cluster: that process must advertise its
routable IP to the other nodes.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
LOCAL_RAY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_local_ray_environment() -> None:
    """Set `LOCAL_RAY_ENVIRONMENT` in this process; call it before the first `import ray`."""
    os.environ.update(LOCAL_RAY_ENVIRONMENT)


def init_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray on loopback with `num_cpus` CPUs (None: every core); raise if it would not be loopback."""
    import ray
    from ray._private import ray_constants  # the flag Ray itself consults; no public API exposes it

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "Ray was imported without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so a local Ray would listen on every "
            "interface; call prefill_service.local_ray.apply_local_ray_environment() before importing ray"
        )
    os.environ.update(LOCAL_RAY_ENVIRONMENT)  # usage statistics are read at start, by Ray's own processes
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"local Ray started on {node_ip} instead of {LOOPBACK}; it has been shut down")
