"""The commands the containers run and the sizes they assume.

The `snapkv-serve` arguments must parse with the real CLI parser, and the Ray start-up scripts must
follow KubeRay's overwrite-container-cmd contract. Sizes must fit each other: the actors in the Ray
cluster, the threads in the CPU requests, the KV budget in the memory limit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess

from snapkv.cli import build_parser
from tests.k8s.manifests import GRPC_PORTS, container_port, find, render, snapkv_argv, workload, workloads

GPU = "nvidia.com/gpu"
MIB = 2**20
# Room a CPU decode worker needs beside its KV budget: the fp32 model, its joined projections, and
# Python and torch. Measured on the embedded model: 1,792 MiB resident after one step of 32 rows.
CPU_DECODE_OVERHEAD_BYTES = 1792 * MIB
QUANTITY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse with the real CLI parser, so that a rejected argument fails the test with argparse's message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"snapkv-serve rejects {argv}: {stderr.getvalue().strip()}") from None


def to_bytes(quantity: str) -> int:
    for suffix, factor in QUANTITY_SUFFIXES.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


def to_cpus(quantity: str) -> float:
    return int(quantity.removesuffix("m")) / 1000 if quantity.endswith("m") else float(quantity)


def gpu_limit(container: dict) -> int:
    return int(container["resources"].get("limits", {}).get(GPU, 0))


def test_serving_containers_parse_with_cli(resources):
    parsed = {}
    for pod in workloads(resources):
        for container in pod.containers:
            argv = snapkv_argv(container)
            if argv is not None:
                parsed[pod.component] = parse(argv)

    assert {component: args.command for component, args in parsed.items()} == {
        "router": "router", "prefill": "prefill", "decode": "decode",
    }
    for component, args in parsed.items():
        assert args.port == GRPC_PORTS[component], component
        assert args.log_level == "INFO", component


def test_cli_parser_rejects_misspelt_flag():
    try:
        parse(["decode", "--kv-budget-mb", "1024"])
    except AssertionError as error:
        assert "unrecognized arguments: --kv-budget-mb" in str(error)
    else:
        raise AssertionError("the parser accepted --kv-budget-mb")


def test_router_uses_least_loaded_policy(resources):
    args = parse(snapkv_argv(workload(resources, "router").containers[0]))
    assert args.policy == "least_loaded"
    assert len(args.prefill) == 1
    assert len(args.decode) == 1


def test_ray_head_starts_ray_then_execs_server(resources):
    cluster = find(resources, "RayCluster", "snapkv-prefill")
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"

    [container] = workload(resources, "prefill").containers
    command = container["command"]
    assert command[:2] == ["/bin/bash", "-c"]
    script = command[2]
    assert "ray start --head --port=6379 --num-cpus=0 --num-gpus=0" in script
    # `ray start --block` would never return to start the server.
    assert "--block" not in script
    assert script.rstrip().endswith('exec snapkv-serve "$@"')
    # KubeRay copies the head container's ports into the head Service that the workers join.
    assert container_port(container, "gcs-server") == 6379

    args = parse(snapkv_argv(container))
    assert args.ray_address == "auto"


def test_ray_workers_run_kuberay_start_command(resources):
    for pod in workloads(resources):
        if pod.ray_group is None or pod.is_ray_head:
            continue
        [container] = pod.containers
        assert container["command"][:2] == ["/bin/bash", "-c"], pod.name
        assert container["command"][2].rstrip().endswith('exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"'), pod.name


def test_ray_scripts_are_valid_bash(resources):
    for pod in workloads(resources):
        if pod.ray_group is None:
            continue
        [container] = pod.containers
        result = subprocess.run(["bash", "-n", "-c", container["command"][2]], capture_output=True, text=True)
        assert result.returncode == 0, f"{pod.name}: {result.stderr}"


def test_ray_workers_fit_prefill_actors(resources):
    args = parse(snapkv_argv(workload(resources, "prefill").containers[0]))
    worker_groups = [pod for pod in workloads(resources) if pod.ray_group is not None and not pod.is_ray_head]

    num_cpus = sum(pod.replicas * int(pod.ray_group["rayStartParams"]["num-cpus"]) for pod in worker_groups)
    num_gpus = sum(pod.replicas * int(pod.ray_group["rayStartParams"].get("num-gpus", 0)) for pod in worker_groups)
    assert args.actors * args.cpus_per_actor <= num_cpus
    assert args.actors * args.gpus_per_actor <= num_gpus


def test_ray_resources_match_container_resources(resources):
    for pod in workloads(resources):
        if pod.ray_group is None or pod.is_ray_head:
            continue
        [container] = pod.containers
        params = pod.ray_group["rayStartParams"]
        assert int(params["num-cpus"]) <= to_cpus(container["resources"]["requests"]["cpu"]), pod.name
        assert int(params.get("num-gpus", 0)) == gpu_limit(container), pod.name

        [shm] = [v for v in pod.pod_spec["volumes"] if v["name"] == "shm"]
        assert int(params["object-store-memory"]) <= to_bytes(shm["emptyDir"]["sizeLimit"]), pod.name


def test_decode_threads_fit_cpu_request(resources):
    [container] = workload(resources, "decode").containers
    args = parse(snapkv_argv(container))
    assert args.threads is not None
    assert args.threads <= to_cpus(container["resources"]["requests"]["cpu"])


def test_devices_match_overlay(resources, overlay):
    decode = workload(resources, "decode")
    decode_args = parse(snapkv_argv(decode.containers[0]))
    prefill_args = parse(snapkv_argv(workload(resources, "prefill").containers[0]))
    gpus = {pod.name: sum(gpu_limit(c) for c in pod.containers) for pod in workloads(resources)}

    if overlay == "cpu":
        assert decode_args.device == "cpu"
        assert prefill_args.gpus_per_actor == 0
        assert set(gpus.values()) == {0}
    else:
        assert decode_args.device == "cuda"
        assert prefill_args.gpus_per_actor == 1
        assert gpus == {
            "Deployment/snapkv-router": 0,
            "Deployment/snapkv-decode": 1,
            "RayCluster/snapkv-prefill head": 0,
            "RayCluster/snapkv-prefill worker group gpu-workers": 1,
        }


def test_cpu_decode_memory_holds_kv_budget():
    # Only on the CPU does the KV budget take host memory. On a GPU it is reserved in GPU memory.
    [container] = workload(render("cpu"), "decode").containers
    args = parse(snapkv_argv(container))
    assert args.device == "cpu"
    limit_bytes = to_bytes(container["resources"]["limits"]["memory"])
    assert args.kv_budget_mib * MIB + CPU_DECODE_OVERHEAD_BYTES <= limit_bytes
