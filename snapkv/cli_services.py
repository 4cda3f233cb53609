"""Command handlers that run the services: `decode`, `prefill`, `router` and `up` (all three at once).

`snapkv.cli` parses the flags and calls these with the parsed namespace. The service packages are
imported here, lazily, so that the core package never depends on them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger("snapkv_serve")

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 600.0  # the first start converts the embedded model


def _start_metrics(port: int | None, host: str) -> None:
    if port is not None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
        print(f"metrics on http://{host}:{port}/metrics", flush=True)


def run_decode(args: argparse.Namespace) -> int:
    from decode_service.metrics import DecodeMetrics
    from decode_service.server import serve
    from snapkv.engine import Engine
    from snapkv.model import resolve_model
    from snapkv.serving import serve_until_signal

    engine = Engine(resolve_model(args.model, args.cache_dir))
    _start_metrics(args.metrics_port, args.host)

    async def main() -> None:
        address = f"{args.host}:{args.port}"
        server, port, servicer = await serve(
            engine, address, args.kv_budget_mib << 20, args.lease_s, args.max_batch_size,
            DecodeMetrics(engine.name, worker_name(args.port)),
        )
        print(f"decode worker listening on {args.host}:{port}", flush=True)
        await serve_until_signal(server, servicer.scheduler.stop)

    asyncio.run(main())
    return 0


def run_prefill(args: argparse.Namespace) -> int:
    from prefill_service.server import serve
    from snapkv.serving import serve_until_signal

    _start_metrics(args.metrics_port, args.host)

    async def main() -> None:
        server, port = await serve(
            args.model, f"{args.host}:{args.port}", num_actors=args.actors, cpus_per_actor=args.cpus_per_actor
        )
        print(f"prefill server listening on {args.host}:{port}", flush=True)
        await serve_until_signal(server, getattr(server, "shutdown_actors", None))

    asyncio.run(main())
    return 0


def run_router(args: argparse.Namespace) -> int:
    from router.server import serve
    from snapkv.model import resolve_tokenizer
    from snapkv.serving import serve_until_signal

    tokenizer = resolve_tokenizer(args.model, args.cache_dir)
    _start_metrics(args.metrics_port, args.host)

    async def main() -> None:
        server, port = await serve(
            tokenizer, args.prefill, args.decode, f"{args.host}:{args.port}", policy=args.policy
        )
        print(f"router listening on {args.host}:{port}", flush=True)
        await serve_until_signal(server)

    asyncio.run(main())
    return 0


def worker_name(port: int) -> str:
    """Return the `worker` metric label: host name (the pod name on Kubernetes) and port."""
    return f"{socket.gethostname()}:{port}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_healthy(name: str, address: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll grpc.health.v1 at `address` until SERVING; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode} during start-up")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f} s")


def run_up(args: argparse.Namespace) -> int:
    """Start decode, prefill and router as child processes on loopback; stop them all on SIGINT/SIGTERM."""
    decode_port, prefill_port = free_port(), free_port()
    common = ["--model", args.model]
    if args.cache_dir:
        common += ["--cache-dir", str(args.cache_dir)]
    metrics = {"decode": args.metrics_port, "prefill": args.metrics_port + 1, "router": args.metrics_port + 2}
    commands = {
        "decode": ["decode", "--port", str(decode_port), "--metrics-port", str(metrics["decode"])],
        "prefill": ["prefill", "--port", str(prefill_port), "--metrics-port", str(metrics["prefill"])],
        "router": [
            "router", "--port", str(args.port), "--metrics-port", str(metrics["router"]),
            "--prefill", f"{LOOPBACK}:{prefill_port}", "--decode", f"{LOOPBACK}:{decode_port}",
        ],
    }
    addresses = {"decode": decode_port, "prefill": prefill_port, "router": args.port}

    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    children: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            argv = [sys.executable, "-m", "snapkv.cli", "--log-level", args.log_level, *command, *common]
            children[name] = subprocess.Popen(argv)
            wait_healthy(name, f"{LOOPBACK}:{addresses[name]}", children[name], STARTUP_TIMEOUT_S)
        for name, port in metrics.items():
            print(f"{name} metrics on http://{LOOPBACK}:{port}/metrics", flush=True)
        print(f"SnapKV Serve is up: router at {LOOPBACK}:{args.port}", flush=True)
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {child.returncode}")
            time.sleep(0.2)
        return 0
    finally:
        _stop_children(children)


def _stop_children(children: dict[str, subprocess.Popen]) -> None:
    for child in reversed(list(children.values())):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for name, child in children.items():
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within 15 s; killing it", name)
            child.kill()
            child.wait()
