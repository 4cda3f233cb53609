"""Every rendered resource validates offline.

Built-in kinds validate against the Kubernetes OpenAPI schemas that kubernetes-validate ships, in
strict mode, where unknown fields are errors. Custom resources validate against the CRD schemas
vendored in crds/, and the RayCluster's pod templates against Kubernetes' PodTemplateSpec.
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.k8s import crd_schema
from tests.k8s.manifests import find, of_kind

# The oldest Kubernetes release these manifests target. Native gRPC probes are GA since 1.27 and a
# PodDisruptionBudget's unhealthyPodEvictionPolicy since 1.31.
KUBERNETES_VERSION = "1.33.0"


def builtin_errors(resource: dict) -> list[str]:
    """Return the strict schema violations of a built-in resource (empty when it is valid)."""
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.path) or "<root>"
        return [f"{path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"no schema, and no vendored CRD either: {error.message}"]
    return []


def describe(resource: dict) -> str:
    return f"{resource['kind']}/{resource['metadata']['name']}"


def test_builtin_resources_validate(resources):
    builtins = [r for r in resources if not crd_schema.is_custom(r)]
    assert {r["kind"] for r in builtins} == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}

    errors = {describe(r): builtin_errors(r) for r in builtins}
    assert {name: found for name, found in errors.items() if found} == {}


def test_custom_resources_validate_against_crds(resources):
    customs = [r for r in resources if crd_schema.is_custom(r)]
    assert sorted(describe(r) for r in customs) == [
        "PodMonitor/snapkv-serve", "PrometheusRule/snapkv-serve", "RayCluster/snapkv-prefill",
    ]

    for resource in customs:
        assert crd_schema.validation_errors(resource) == [], describe(resource)


def test_custom_resource_metadata_validates(resources):
    # A CRD schema leaves metadata open, but the API server checks it as ObjectMeta. A bare
    # ConfigMap wrapped around it gets the same check here.
    for resource in filter(crd_schema.is_custom, resources):
        wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": resource["metadata"]}
        assert builtin_errors(wrapper) == [], describe(resource)


def test_ray_pod_templates_validate(resources):
    cluster = find(resources, "RayCluster", "snapkv-prefill")
    groups = [("head", cluster["spec"]["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in cluster["spec"]["workerGroupSpecs"]]

    for name, group in groups:
        pod_template = {
            "apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"snapkv-prefill-{name}"},
            "template": group["template"],
        }
        assert builtin_errors(pod_template) == [], name


def test_builtin_validation_rejects_unknown_field(resources):
    deployment = copy.deepcopy(of_kind(resources, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}

    [error] = builtin_errors(deployment)
    assert "readinessProbes" in error


@pytest.mark.parametrize(
    ("kind", "name", "path", "field"),
    [
        ("PodMonitor", "snapkv-serve", ("spec", "podMetricsEndpoints", 0), "prot"),
        ("RayCluster", "snapkv-prefill", ("spec", "workerGroupSpecs", 0), "replica"),
        ("PrometheusRule", "snapkv-serve", ("spec", "groups", 0), "rule"),
    ],
)
def test_crd_validation_rejects_unknown_field(resources, kind, name, path, field):
    resource = copy.deepcopy(find(resources, kind, name))
    target = resource
    for key in path:
        target = target[key]
    target[field] = 1

    [error] = crd_schema.validation_errors(resource)
    assert error.startswith(".".join(str(key) for key in path) + ":")
    assert repr(field) in error


def test_crd_validation_requires_fields(resources):
    cluster = copy.deepcopy(find(resources, "RayCluster", "snapkv-prefill"))
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]

    assert crd_schema.validation_errors(cluster) == [
        "spec.workerGroupSpecs.0: 'groupName' is a required property",
    ]
