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
from typing import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snapkv.proto import serving_pb2 as pb
from snapkv.transport import ChannelTLS, open_channel

ROUTER_SERVICE = pb.DESCRIPTOR.services_by_name["Router"].full_name

logger = logging.getLogger("snapkv_serve")

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 600.0  # the first start converts the embedded model
# Busy-wait spins of a decode worker's OpenMP threads before they sleep; see `LocalStack.start_one`.
DECODE_SPINCOUNT = "100000"


def _start_metrics(port: int | None, host: str) -> None:
    if port is not None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)
        print(f"metrics on http://{host}:{port}/metrics", flush=True)


def engine_kv_dtype(name: str):
    """Return the `Engine` kv_dtype argument for a --kv-dtype choice: "auto", None ("model") or a torch dtype."""
    import torch

    from snapkv.engine import AUTO_KV_DTYPE

    arguments = {
        "auto": AUTO_KV_DTYPE, "model": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
    }
    return arguments[name]


def decode_engine(args: argparse.Namespace):
    """Load the `decode` command's model onto its device; return its `Engine` with the decode options applied."""
    import torch

    from snapkv.engine import WEIGHT_DTYPES, Engine
    from snapkv.model import resolve_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.decode_weights != "model" and device != "cpu":
        raise ValueError(f"invalid --decode-weights {args.decode_weights} on {device}: packed bf16 weights need the "
                         "CPU (oneDNN). Use --decode-weights model, or --device cpu.")
    return Engine(
        resolve_model(args.model, args.cache_dir, device),
        compile_decode=args.compile_decode,
        kv_dtype=engine_kv_dtype(args.kv_dtype),
        weight_dtype=WEIGHT_DTYPES[args.decode_weights],
    )


def run_decode(args: argparse.Namespace) -> int:
    import torch

    from decode_service.metrics import DecodeMetrics
    from decode_service.server import serve
    from snapkv.serving import serve_until_signal

    # Only the decode loop's thread runs torch on several threads; this one loads the model and
    # decodes transfers on one. libgomp keeps a team of worker threads for every thread that ran a
    # parallel region. When those threads outnumber the cores, it cuts the busy-wait between regions
    # to 100 spins, and each decode step took about 10 ms more on a 2-core machine.
    decode_threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)
    engine = decode_engine(args)
    _start_metrics(args.metrics_port, args.host)

    async def main() -> None:
        address = f"{args.host}:{args.port}"
        server, port, servicer = await serve(
            engine, address, args.kv_budget_mib << 20, args.lease_s, args.max_batch_size,
            DecodeMetrics(engine.name, worker_name(args.port)), tls=args.tls, health_address=health_address(args),
            decode_threads=decode_threads,
        )
        print(f"decode worker listening on {args.host}:{port}", flush=True)
        await serve_until_signal(server, servicer.close, f"decode worker on port {port}")

    asyncio.run(main())
    return 0


def run_prefill(args: argparse.Namespace) -> int:
    if args.prefill_weights != "model" and (args.gpus_per_actor or 0) > 0:
        raise ValueError(f"invalid --prefill-weights {args.prefill_weights} with --gpus-per-actor "
                         f"{args.gpus_per_actor}: packed bf16 weights need the CPU (oneDNN). Use --prefill-weights model.")
    if args.ray_address is None:
        # Ray reads these settings once, at its first import, so they are applied before anything imports it.
        from prefill_service.local_ray import apply_local_ray_environment

        apply_local_ray_environment()
    from prefill_service.metrics import PrefillMetrics
    from prefill_service.server import serve
    from snapkv.serving import serve_until_signal

    _start_metrics(args.metrics_port, args.host)

    async def main() -> None:
        server, port = await serve(
            args.model, f"{args.host}:{args.port}", num_actors=args.actors, cpus_per_actor=args.cpus_per_actor,
            ray_address=args.ray_address, gpus_per_actor=args.gpus_per_actor, cache_dir=args.cache_dir,
            metrics=PrefillMetrics(args.model, worker_name(args.port)), tls=args.tls, decode_tls=args.peer_tls,
            health_address=health_address(args), weights=args.prefill_weights,
        )
        print(f"prefill server listening on {args.host}:{port}", flush=True)
        await serve_until_signal(server, server.shutdown_actors, f"prefill server on port {port}")

    asyncio.run(main())
    return 0


def run_router(args: argparse.Namespace) -> int:
    from router.metrics import RouterMetrics
    from router.requests import RequestLimits
    from router.server import serve
    from snapkv.model import resolve_tokenizer
    from snapkv.serving import serve_until_signal

    tokenizer = resolve_tokenizer(args.model, args.cache_dir)
    _start_metrics(args.metrics_port, args.host)

    async def main() -> None:
        server, port = await serve(
            tokenizer, args.prefill, args.decode, f"{args.host}:{args.port}", policy=args.policy,
            metrics=RouterMetrics(args.model, worker_name(args.port)), tls=args.tls, peer_tls=args.peer_tls,
            auth_token=args.auth_token, limits=RequestLimits(max_tokens=args.max_tokens_limit, budget=args.budget_limit),
            health_address=health_address(args),
        )
        print(f"router listening on {args.host}:{port}", flush=True)
        await serve_until_signal(server, name=f"router on port {port}")

    asyncio.run(main())
    return 0


def health_address(args: argparse.Namespace) -> str | None:
    """Return where `--health-port` serves the plaintext health checks, on the service's own host, or None."""
    return None if args.health_port is None else f"{args.host}:{args.health_port}"


def worker_name(port: int) -> str:
    """Return the `worker` metric label: host name (the pod name on Kubernetes) and port."""
    return f"{socket.gethostname()}:{port}"


def split_cores(num_cores: int) -> tuple[int, int]:
    """Return (decode threads, prefill actor CPUs) for one machine.

    Prefill gets every core and decode a quarter (at least one). Idle OpenMP threads sleep (after a
    short busy-wait in decode; see `LocalStack.start_one`), so the two contend only while both
    compute, and a lone prefill runs at full speed.
    """
    return max(1, num_cores // 4), num_cores


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_healthy(
    name: str, address: str, process: subprocess.Popen, timeout_s: float, tls: ChannelTLS | None = None,
    service: str = "",
) -> None:
    """Poll grpc.health.v1 for `service` at `address` until SERVING; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    with open_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode} during start-up")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{name} at {address} did not become healthy within {timeout_s:.0f} s")


class LocalStack:
    """Decode, prefill and router as child processes of this one, on loopback.

    Each service starts only after the previous one reports SERVING over grpc.health.v1. `stop()`
    sends SIGTERM to all (router first) and kills any still running 15 s later. `service_options`
    adds command-line options per service name, and `health_tls` is how the health checks connect
    when those options turn TLS on. With `num_decode_workers` above 1, the extra decode workers are
    named "decode-2", "decode-3" and so on, get `decode_options` too, and the router uses them all.
    """

    def __init__(
        self,
        model: str,
        router_port: int = 0,
        metrics_port: int | None = None,
        cache_dir=None,
        log_level: str = "WARNING",
        decode_options: tuple[str, ...] = (),
        service_options: Mapping[str, Sequence[str]] | None = None,
        health_tls: ChannelTLS | None = None,
        num_decode_workers: int = 1,
    ):
        decode_names = ["decode"] + [f"decode-{number}" for number in range(2, num_decode_workers + 1)]
        self.decode_names = decode_names
        self.ports = {name: free_port() for name in decode_names}
        self.ports.update(prefill=free_port(), router=router_port or free_port())
        self.metrics_ports = (
            {} if metrics_port is None else {name: metrics_port + i for i, name in enumerate(self.ports)}
        )
        common = ["--model", model] + (["--cache-dir", str(cache_dir)] if cache_dir else [])
        # Decode and prefill share this machine's cores; see `split_cores`.
        decode_threads, prefill_cpus = split_cores(os.cpu_count() or 1)
        self.commands = {name: ["decode", "--threads", str(decode_threads), *decode_options] for name in decode_names}
        self.commands["prefill"] = ["prefill", "--cpus-per-actor", str(prefill_cpus)]
        self.commands["router"] = ["router", "--prefill", self.address("prefill")]
        for name in decode_names:
            self.commands["router"] += ["--decode", self.address(name)]
        for name, command in self.commands.items():
            command += ["--host", LOOPBACK, "--port", str(self.ports[name]), *common]
            command += (service_options or {}).get(name, ())
            if name in self.metrics_ports:
                command += ["--metrics-port", str(self.metrics_ports[name])]
        self.log_level = log_level
        self.health_tls = health_tls
        self.processes: dict[str, subprocess.Popen] = {}

    def address(self, name: str) -> str:
        return f"{LOOPBACK}:{self.ports[name]}"

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> "LocalStack":
        for name in self.commands:
            self.start_one(name, timeout_s)
        return self

    def start_one(self, name: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start (or restart) one service on its port and wait until it is healthy."""
        argv = [sys.executable, "-m", "snapkv.cli", "--log-level", self.log_level, *self.commands[name]]
        # Idle OpenMP threads sleep instead of spinning, so neighbouring services keep their cores.
        # A decode step runs hundreds of short parallel regions, so decode threads busy-wait first.
        # libgomp applies an explicit GOMP_SPINCOUNT over PASSIVE (as does k8s/base/decode.yaml).
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        if name in self.decode_names:
            env["GOMP_SPINCOUNT"] = DECODE_SPINCOUNT
        self.processes[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env)
        # The router's own service turns SERVING once it has seen a healthy prefill and decode worker,
        # so a stack that has started can serve its first request.
        service = ROUTER_SERVICE if name == "router" else ""
        wait_healthy(name, self.address(name), self.processes[name], timeout_s, self.health_tls, service)

    def check_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}")

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within 15 s; killing it", name)
                process.kill()
                process.wait()

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def run_up(args: argparse.Namespace) -> int:
    """Start decode, prefill and router on loopback; stop them all on SIGINT or SIGTERM."""
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    router_options = [] if args.auth_token_file is None else ["--auth-token-file", str(args.auth_token_file)]
    stack = LocalStack(
        args.model, args.port, args.metrics_port, args.cache_dir, args.log_level,
        decode_options=("--kv-dtype", args.kv_dtype, "--decode-weights", args.decode_weights)
        + (("--compile-decode",) if args.compile_decode else ()),
        service_options={"router": router_options, "prefill": ["--prefill-weights", args.prefill_weights]},
    )
    with stack:
        stack.start()
        for name, port in stack.metrics_ports.items():
            print(f"{name} metrics on http://{LOOPBACK}:{port}/metrics", flush=True)
        print(f"SnapKV Serve is up: router at {stack.address('router')}", flush=True)
        while not stopping:
            stack.check_running()
            time.sleep(0.2)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Start the stack, send one request through the router, print the generated text and figures, stop."""
    from snapkv.cli import DEFAULT_MODEL_SPEC

    with LocalStack(args.model or DEFAULT_MODEL_SPEC, 0, None, args.cache_dir, args.log_level) as stack:
        print("starting decode, prefill (Ray) and router on loopback ...", file=sys.stderr, flush=True)
        stack.start()
        args.target = stack.address("router")
        print(f"asking the router at {args.target}\n", file=sys.stderr, flush=True)
        return run_generate_target(args)


def run_generate_target(args: argparse.Namespace) -> int:
    """Send one request to a router, streaming the generated text (or printing one JSON object with --json)."""
    import json

    from router.client import SnapKVError
    from snapkv.cli import CommandError, format_figures

    pieces: list[str] = []
    try:
        summary = _stream_from_router(args, pieces)
    except SnapKVError as error:
        hint = ""
        # gRPC's own message when no connection to the target could be made (not a status the router sent).
        if error.code == grpc.StatusCode.UNAVAILABLE and error.details.startswith("failed to connect to all addresses"):
            hint = f"; check that a router listens on {args.target} (`snapkv-serve up` starts one, on port 50051 by default)"
        raise CommandError(f"request to {args.target} failed with {error}{hint}") from error

    figures = {
        "prompt_tokens": summary.prompt_tokens,
        "kept_tokens": summary.kept_tokens,
        "compression_ratio": round(summary.compression_ratio, 4),
        "kv_bytes_full": summary.kv_bytes_full,
        # Kept positions in the model's dtype: the full size scaled by kept / prompt tokens.
        "kv_bytes_kept": summary.kv_bytes_full * summary.kept_tokens // max(summary.prompt_tokens, 1),
        "ttft_s": round(summary.ttft_s, 4),
        "tpot_s": round(summary.tpot_s, 4) if summary.completion_tokens > 1 else None,
        "finish_reason": summary.finish_reason,
        "text": "".join(pieces),
        "kv_bytes_sent": summary.kv_bytes_sent,
        "wire_dtype": summary.wire_dtype,
    }
    if args.json:
        print(json.dumps(figures))
        return 0

    print()
    transfer = (
        f"sent {summary.kv_bytes_sent / 2**20:.2f} MiB as {summary.wire_dtype}; "
        f"prefill {summary.prefill_s:.2f} s, transfer {summary.transfer_s:.3f} s"
    )
    print(f"{format_figures(argparse.Namespace(**figures))}; {transfer}", file=sys.stderr)
    return 0


def _stream_from_router(args: argparse.Namespace, pieces: list[str]):
    """Stream one request; append each text delta to `pieces` (and stdout unless --json); return the summary."""
    from router.client import SnapKVClient, Summary
    from snapkv.cli import read_prompt

    if args.no_compress:
        compression = {"no_compress": True}
    else:
        compression = {"budget": args.budget, "window": args.window, "kernel": args.kernel, "pooling": args.pooling}
    summary = None
    with SnapKVClient(args.target, timeout_s=args.timeout, tls=args.tls, auth_token=args.auth_token) as client:
        items = client.generate(
            read_prompt(args), raw=args.raw, max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop, wire_dtype=args.wire_dtype,
            **compression,
        )
        for item in items:
            if isinstance(item, Summary):
                summary = item
                continue
            pieces.append(item.text)
            if not args.json and item.text:
                sys.stdout.write(item.text)
                sys.stdout.flush()
    return summary
