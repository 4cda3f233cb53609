"""Names, labels and ports agree across the rendered manifests: containers, Services, probes, the
router's targets, the PodMonitor and the PodDisruptionBudgets."""

from __future__ import annotations

import re

from snapkv.cli_services import DECODE_SPINCOUNT
from snapkv.proto import serving_pb2
from tests.k8s.manifests import (
    GRPC_PORTS, METRICS_PORT, PART_OF, REPO, SERVING_COMPONENTS, container_port, find, flag, of_kind, selects,
    snapkv_argv, split_host_port, workload, workloads,
)

HEALTH_SERVICES = {
    component: serving_pb2.DESCRIPTOR.services_by_name[component.capitalize()].full_name
    for component in SERVING_COMPONENTS
}


def serving_container(resources: list[dict], component: str) -> dict:
    """The container that runs `snapkv-serve` in the workload of a component."""
    [container] = [c for c in workload(resources, component).containers if snapkv_argv(c) is not None]
    return container


def target_port_number(service_port: dict, container: dict) -> int | None:
    target = service_port.get("targetPort", service_port["port"])
    return container_port(container, target) if isinstance(target, str) else target


def test_health_service_names_match_proto():
    assert HEALTH_SERVICES == {
        "router": "snapkv.serving.v1.Router",
        "prefill": "snapkv.serving.v1.Prefill",
        "decode": "snapkv.serving.v1.Decode",
    }


def test_serving_containers_name_their_ports(resources):
    for component in SERVING_COMPONENTS:
        container = serving_container(resources, component)
        assert container_port(container, "grpc") == GRPC_PORTS[component], component
        assert container_port(container, "metrics") == METRICS_PORT, component


def test_port_flags_match_container_ports(resources):
    for component in SERVING_COMPONENTS:
        container = serving_container(resources, component)
        argv = snapkv_argv(container)
        assert int(flag(argv, "--port")) == container_port(container, "grpc"), component
        assert int(flag(argv, "--metrics-port")) == container_port(container, "metrics"), component
        # Bound to every interface, so that the kubelet, Services and Prometheus reach it.
        assert flag(argv, "--host") == "0.0.0.0", component


def probe_check(probe: dict) -> str:
    """Describe what a probe checks: "grpc <service name>" ('' for the process) or "tcp <port>"."""
    if "grpc" in probe:
        return f"grpc {probe['grpc'].get('service', '')!r} on {probe['grpc']['port']}"
    return f"tcp {probe['tcpSocket']['port']}"


def test_probes_check_expected_health(resources):
    # Readiness checks the component's own gRPC health service. The router's service waits for
    # healthy workers and prefill's for ready actors, so their startup or liveness probes check the
    # process: the empty service name, or for prefill, whose empty name also follows its actors, a
    # TCP connection.
    router, prefill, decode = (f"'{HEALTH_SERVICES[c]}' on {GRPC_PORTS[c]}" for c in SERVING_COMPONENTS)
    expected = {  # (startupProbe, readinessProbe, livenessProbe)
        "router": ("grpc '' on 50051", f"grpc {router}", "grpc '' on 50051"),
        "prefill": (f"grpc {prefill}", f"grpc {prefill}", "tcp grpc"),
        "decode": (f"grpc {decode}", f"grpc {decode}", "grpc '' on 50053"),
    }
    for component in SERVING_COMPONENTS:
        container = serving_container(resources, component)
        probes = tuple(probe_check(container[name]) for name in ("startupProbe", "readinessProbe", "livenessProbe"))
        assert probes == expected[component], component


def test_startup_probes_allow_model_loading(resources):
    # Decode loads the model and prefill waits for its Ray actors to load it: minutes, not seconds.
    for component, minimum_s in (("router", 60), ("decode", 180), ("prefill", 600)):
        probe = serving_container(resources, component)["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= minimum_s, component


def test_ray_worker_probes_check_raylet_port(resources):
    for worker in workloads(resources):
        if worker.ray_group is None or worker.is_ray_head:
            continue
        [container] = worker.containers
        raylet_port = int(worker.ray_group["rayStartParams"]["node-manager-port"])
        assert container_port(container, "node-manager") == raylet_port, worker.name
        for probe_name in ("readinessProbe", "livenessProbe"):
            assert container[probe_name]["tcpSocket"] == {"port": "node-manager"}, f"{worker.name} {probe_name}"


def test_services_select_one_workload_each(resources):
    expected = {"snapkv-router": "router", "snapkv-prefill": "prefill", "snapkv-decode": "decode"}
    assert sorted(s["metadata"]["name"] for s in of_kind(resources, "Service")) == sorted(expected)

    for service in of_kind(resources, "Service"):
        name = service["metadata"]["name"]
        selected = [w for w in workloads(resources) if selects(service["spec"]["selector"], w.labels)]
        assert [w.component for w in selected] == [expected[name]], name

        container = serving_container(resources, expected[name])
        for port in service["spec"]["ports"]:
            assert target_port_number(port, container) == GRPC_PORTS[expected[name]], f"{name} port {port['name']}"


def test_decode_service_is_headless(resources):
    service = find(resources, "Service", "snapkv-decode")
    assert service["spec"]["clusterIP"] == "None"
    # Without a virtual IP nothing maps ports: the Service port must be the pod's port.
    [port] = service["spec"]["ports"]
    assert port["port"] == container_port(serving_container(resources, "decode"), "grpc")


def test_router_targets_name_services_and_ports(resources):
    argv = snapkv_argv(serving_container(resources, "router"))
    services = {s["metadata"]["name"]: s for s in of_kind(resources, "Service")}

    for option, component in (("--prefill", "prefill"), ("--decode", "decode")):
        host, port = split_host_port(flag(argv, option))
        assert host in services, f"{option} {host!r} is not a Service"
        service = services[host]
        assert selects(service["spec"]["selector"], workload(resources, component).labels), option
        assert port in [p["port"] for p in service["spec"]["ports"]], option

    decode_host, _ = split_host_port(flag(argv, "--decode"))
    assert services[decode_host]["spec"].get("clusterIP") == "None"


def test_podmonitor_scrapes_serving_pods(resources):
    monitor = find(resources, "PodMonitor", "snapkv-serve")
    selected = [w for w in workloads(resources) if selects(monitor["spec"]["selector"], w.labels)]
    assert sorted(w.component for w in selected) == sorted(SERVING_COMPONENTS)

    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    for scraped in selected:
        assert container_port(serving_container(resources, scraped.component), "metrics") == METRICS_PORT


def test_disruption_budgets_select_workloads(resources):
    budgets = {b["metadata"]["name"]: b for b in of_kind(resources, "PodDisruptionBudget")}
    expected = {"snapkv-router": "router", "snapkv-decode": "decode", "snapkv-prefill-workers": "prefill-worker"}
    assert sorted(budgets) == sorted(expected)

    for name, budget in budgets.items():
        selected = [w for w in workloads(resources) if selects(budget["spec"]["selector"], w.labels)]
        assert [w.component for w in selected] == [expected[name]], name


def test_deployment_selectors_match_templates(resources):
    for deployment in of_kind(resources, "Deployment"):
        spec = deployment["spec"]
        assert selects(spec["selector"], spec["template"]["metadata"]["labels"]), deployment["metadata"]["name"]


def test_resources_carry_app_labels(resources):
    for resource in resources:
        labels = resource["metadata"].get("labels", {})
        assert labels.items() >= PART_OF.items(), f"{resource['kind']}/{resource['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "snapkv-serve"

    for pod in workloads(resources):
        assert pod.labels.items() >= {**PART_OF, "app.kubernetes.io/name": "snapkv-serve"}.items(), pod.name
        assert pod.component in (*SERVING_COMPONENTS, "prefill-worker"), pod.name


def test_images_match_overlay(resources, overlay):
    images = {container["image"] for pod in workloads(resources) for container in pod.containers}
    assert images == {f"snapkv-serve:{overlay}"}


def test_ray_version_matches_pyproject(resources):
    [ray_version] = re.findall(r'"ray==([^"]+)"', (REPO / "pyproject.toml").read_text())
    cluster = find(resources, "RayCluster", "snapkv-prefill")
    assert cluster["spec"]["rayVersion"] == ray_version


def test_decode_spin_count_matches_local_stack(resources):
    # The decode Deployment and `snapkv-serve up` give decode the same OpenMP busy-wait.
    environment = {variable["name"]: variable.get("value") for variable in serving_container(resources, "decode")["env"]}
    assert environment["GOMP_SPINCOUNT"] == DECODE_SPINCOUNT
