"""`snapkv-serve up` keeps every service on loopback: each child gets `--host 127.0.0.1`, and every
socket that the services and their Ray processes listen on is bound to a loopback address."""

import asyncio
import ipaddress

import grpc
import psutil
import pytest
from grpc_health.v1 import health

from snapkv.cli import build_parser
from snapkv.cli_services import LOOPBACK, LocalStack
from snapkv.serving import bind_health_server
from snapkv.transport import add_port, server_options

SERVICES = ("decode", "prefill", "router")


def option_value(command, flag):
    [index] = [i for i, item in enumerate(command) if item == flag]
    return command[index + 1]


def test_up_passes_loopback_host_to_every_service():
    stack = LocalStack("tiny-llama", metrics_port=9400)
    assert tuple(stack.commands) == SERVICES
    for name, command in stack.commands.items():
        assert command.count("--host") == 1, name
        assert option_value(command, "--host") == LOOPBACK, name
    assert option_value(stack.commands["router"], "--prefill") == f"{LOOPBACK}:{stack.ports['prefill']}"
    assert option_value(stack.commands["router"], "--decode") == f"{LOOPBACK}:{stack.ports['decode']}"


def test_up_has_no_host_option():
    args = build_parser().parse_args(["up"])
    assert not hasattr(args, "host")


def test_service_host_defaults_to_loopback():
    for name in SERVICES:
        extra = ["--prefill", "a:1", "--decode", "b:2"] if name == "router" else []
        assert build_parser().parse_args([name, *extra]).host == LOOPBACK


def test_running_stack_listens_on_loopback_only(stack):
    # Every process of the stack, Ray's GCS, raylet and workers under prefill included.
    processes = []
    for process in stack.processes.values():
        parent = psutil.Process(process.pid)
        processes += [parent, *parent.children(recursive=True)]

    listening = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a Ray worker that exited meanwhile
        listening += [(process.name(), c.laddr) for c in connections if c.status == psutil.CONN_LISTEN]

    ports = {address.port for _, address in listening}
    for name in SERVICES:
        assert stack.ports[name] in ports, f"{name} is not listening on its port"
    exposed = [(name, address) for name, address in listening if not is_loopback(address.ip)]
    assert exposed == []


def test_taken_port_fails_to_bind(stack):
    # gRPC's default SO_REUSEPORT would let this server share the running decode worker's port.
    address = f"{LOOPBACK}:{stack.ports['decode']}"

    async def bind_both() -> None:
        server = grpc.aio.server(options=server_options(1024, 1024))
        with pytest.raises(OSError, match="could not bind"):
            add_port(server, address, None)
        with pytest.raises(OSError, match="failed to bind the health port"):
            bind_health_server(health.aio.HealthServicer(), address)

    asyncio.run(bind_both())


def is_loopback(ip: str) -> bool:
    # gRPC binds 127.0.0.1 on a dual-stack socket, which reports it as ::ffff:127.0.0.1.
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
