"""Every pod runs as the image's non-root user with a read-only root filesystem, drops all
capabilities, writes only to emptyDir volumes, and requests CPU and memory with a memory limit."""

from __future__ import annotations

from tests.k8s.manifests import workloads

IMAGE_USER = 10001  # the UID and GID the container image runs as
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": IMAGE_USER,
    "runAsGroup": IMAGE_USER,
    "fsGroup": IMAGE_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def mounted_volumes(pod) -> dict[str, dict]:
    """Map each mount path of the pod's containers to its volume."""
    volumes = {volume["name"]: volume for volume in pod.pod_spec.get("volumes", [])}
    return {
        mount["mountPath"]: volumes[mount["name"]]
        for container in pod.containers
        for mount in container.get("volumeMounts", [])
    }


def test_pods_run_as_image_user(resources):
    for pod in workloads(resources):
        assert pod.pod_spec["securityContext"] == POD_SECURITY, pod.name
        assert pod.pod_spec["automountServiceAccountToken"] is False, pod.name
        for container in pod.containers:
            assert container["securityContext"] == CONTAINER_SECURITY, f"{pod.name} {container['name']}"


def test_pods_write_only_to_empty_dirs(resources):
    for pod in workloads(resources):
        mounts = mounted_volumes(pod)
        assert "/tmp" in mounts, pod.name
        assert all("emptyDir" in volume for volume in mounts.values()), pod.name
        assert all("sizeLimit" in volume["emptyDir"] for volume in mounts.values()), pod.name


def test_ray_pods_have_memory_backed_shm(resources):
    ray_pods = [pod for pod in workloads(resources) if pod.ray_group is not None]
    assert len(ray_pods) == 2

    for pod in ray_pods:
        shm = mounted_volumes(pod).get("/dev/shm")
        assert shm is not None, pod.name
        assert shm["emptyDir"]["medium"] == "Memory", pod.name


def test_containers_request_cpu_and_memory(resources):
    for pod in workloads(resources):
        for container in pod.containers:
            name = f"{pod.name} {container['name']}"
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert {"cpu", "memory"} <= requests.keys(), name
            assert "memory" in limits, name
            # Requesting the whole limit keeps the scheduler from overcommitting node memory, which
            # would expose the pod to eviction and the kernel's OOM killer below its own limit.
            assert requests["memory"] == limits["memory"], name
