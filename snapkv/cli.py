"""The `snapkv-serve` command line. This is the only module that reads flags and environment variables.

    snapkv-serve generate --local --prompt-file doc.txt --question "Who wrote it?" --budget 512
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from snapkv import cli_security
from snapkv.config import POOLING_KINDS, WEIGHT_CHOICES, CompressionConfig, SamplingParams

logger = logging.getLogger("snapkv_serve")

CACHE_DIR_VARIABLE = "SNAPKV_CACHE_DIR"
AUTH_TOKEN_VARIABLE = "SNAPKV_AUTH_TOKEN"  # read by `generate --target` when --auth-token-file is not given
DEFAULT_MODEL_SPEC = "embedded:smollm2-135m-instruct"  # snapkv.model.DEFAULT_MODEL, without importing torch
WIRE_DTYPES = ("fp16", "bf16", "int8", "fp32")
# --kv-dtype's choices, spelled as --wire-dtype's: "auto" is snapkv.engine.AUTO_KV_DTYPE, "model" the model's dtype.
KV_DTYPES = ("auto", "model", "fp16", "bf16", "fp32")
KV_DTYPE_HELP = (
    "dtype the decode cache stores keys and values in; 'auto' (default): fp16 for an fp32 Llama, Mistral or "
    "Qwen2 model, which halves the cache's memory, else the model's dtype; 'model': the model's dtype"
)


# Help of --decode-weights and --prefill-weights, whose choices are snapkv.config.WEIGHT_CHOICES.
WEIGHTS_HELP = (
    "dtype of the {} linear products' weights; 'bf16': packed in bf16, faster on CPUs with bf16 instructions "
    "(AVX512-BF16, AMX), for an fp32 model on a CPU (the vocabulary projection stays fp32); "
    "'model' (default): the model's dtype"
)


def host_port(value: str) -> str:
    """Check a "HOST:PORT" argument (an IPv6 host in brackets); return it unchanged."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid address {value!r}: expected HOST:PORT with a port from 1 to 65535")
    return value


class CommandError(Exception):
    """A failure to report as one line (for example a gRPC status from the router)."""


@dataclass
class Summary:
    """The figures `generate --json` prints, one object per request."""

    prompt_tokens: int
    kept_tokens: int
    compression_ratio: float
    kv_bytes_full: int
    kv_bytes_kept: int
    ttft_s: float
    tpot_s: float | None
    finish_reason: str
    text: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapkv-serve", description="Serve LLMs with SnapKV-compressed prompt caches.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate an answer for one prompt")
    where = generate.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the model in this process")
    where.add_argument("--target", type=host_port, metavar="HOST:PORT", help="send the request to a running router")
    add_generation_options(generate)
    cli_security.add_client_options(generate, AUTH_TOKEN_VARIABLE)

    demo = commands.add_parser("demo", help="start the stack, send one request through the router, stop")
    add_generation_options(demo)

    add_service_commands(commands)
    return parser


def add_generation_options(command: argparse.ArgumentParser) -> None:
    """Add the prompt, model, compression and sampling options shared by `generate` and `demo`."""
    command.add_argument("--wire-dtype", choices=WIRE_DTYPES, default="fp16", help="KV dtype from prefill to decode (--target)")
    command.add_argument("--timeout", type=float, default=None, help="deadline for the whole request in seconds (--target)")
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    command.add_argument("--question", help="text appended after the prompt, separated by a blank line")
    command.add_argument("--model", default=None, help="Hugging Face id, local path, or tiny-llama for tests (default: embedded SmolLM2-135M)")
    command.add_argument("--cache-dir", type=Path, default=None, help=f"folder for converted weights (${CACHE_DIR_VARIABLE})")
    budget = command.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=int, default=CompressionConfig.budget, help="kept tokens, window included")
    budget.add_argument("--no-compress", action="store_true", help="keep the full prompt cache")
    command.add_argument("--window", type=int, default=CompressionConfig.window, help="observation window in tokens")
    command.add_argument("--kernel", type=int, default=CompressionConfig.kernel, help="pooling kernel, odd")
    command.add_argument("--pooling", choices=POOLING_KINDS, default=CompressionConfig.pooling)
    command.add_argument("--max-tokens", type=int, default=SamplingParams.max_tokens, help="maximum generated tokens")
    command.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    command.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    command.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 disables")
    command.add_argument("--seed", type=int, default=None, help="seed for repeatable sampling")
    command.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    command.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    command.add_argument("--json", action="store_true", help="print one JSON object with the answer and figures")


def add_service_commands(commands) -> None:
    def service(name: str, help_text: str, port: int) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
        command.add_argument("--port", type=int, default=port, help=f"gRPC port (default {port})")
        command.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
        command.add_argument(
            "--health-port", type=int, default=None,
            help="also serve grpc.health.v1 alone on this port, without TLS, for probes that do not use TLS (Kubernetes' gRPC probes)",
        )
        command.add_argument("--model", default=DEFAULT_MODEL_SPEC, help="Hugging Face id, local path, or tiny-llama for tests")
        command.add_argument("--cache-dir", type=Path, default=None, help=f"folder for converted weights (${CACHE_DIR_VARIABLE})")
        cli_security.add_server_options(command, outgoing=name != "decode")
        return command

    decode = service("decode", "run a decode worker", 50053)
    decode.add_argument("--kv-budget-mib", type=int, default=2048, help="KV memory the worker may reserve, in MiB")
    decode.add_argument("--lease-s", type=float, default=30.0, help="seconds a loaded cache waits for its stream")
    decode.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together at most")
    decode.add_argument("--threads", type=int, default=None, help="torch CPU threads of the decode loop (default: torch's choice)")
    decode.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when a GPU is visible")
    decode.add_argument(
        "--compile-decode", action="store_true",
        help="compile the decode step with torch.compile before serving (minutes on a small CPU; faster steps)",
    )
    decode.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto", help=KV_DTYPE_HELP)
    decode.add_argument("--decode-weights", choices=WEIGHT_CHOICES, default="model", help=WEIGHTS_HELP.format("decode step's"))

    prefill = service("prefill", "run a prefill server and its Ray actors", 50052)
    prefill.add_argument("--actors", type=int, default=1, help="number of Ray prefill actors")
    prefill.add_argument("--cpus-per-actor", type=int, default=None, help="CPU cores per actor (default: the cores shared among the actors)")
    prefill.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor (default: 1 when the Ray cluster has GPUs, else 0)")
    prefill.add_argument("--prefill-weights", choices=WEIGHT_CHOICES, default="model", help=WEIGHTS_HELP.format("prefill's"))
    prefill.add_argument(
        "--ray-address", default=None,
        help="join this Ray cluster ('auto' on a Ray node, e.g. a KubeRay head); default: start a local Ray on loopback",
    )

    router = service("router", "run the client-facing router", 50051)
    router.add_argument("--prefill", action="append", required=True, type=host_port, metavar="HOST:PORT", help="prefill server (repeatable)")
    router.add_argument("--decode", action="append", required=True, type=host_port, metavar="HOST:PORT", help="decode worker (repeatable)")
    router.add_argument("--policy", choices=("round_robin", "least_loaded", "kv_aware"), default="least_loaded")
    # The defaults repeat router.requests.DEFAULT_*_LIMIT, which this module does not import: it loads transformers.
    router.add_argument(
        "--max-tokens-limit", type=int, default=4096, metavar="N",
        help="largest max_tokens a request may set; decode reserves KV memory for all of them (default 4096)",
    )
    router.add_argument(
        "--budget-limit", type=int, default=8192, metavar="N",
        help="largest SnapKV budget a request may set, in kept positions per KV head (default 8192)",
    )
    router.add_argument(
        "--auth-token-file", type=Path, metavar="FILE",
        help="require 'authorization: Bearer <token>' metadata with the token in this file on every call "
        "except health checks and reflection",
    )

    up = commands.add_parser("up", help="run router, prefill (local Ray) and decode on this machine, on loopback")
    up.add_argument("--port", type=int, default=50051, help="router port (default 50051)")
    up.add_argument("--metrics-port", type=int, default=9400, help="first of three metrics ports: decode, prefill, router (default 9400)")
    up.add_argument("--model", default=DEFAULT_MODEL_SPEC, help="Hugging Face id, local path, or tiny-llama for tests")
    up.add_argument("--cache-dir", type=Path, default=None, help=f"folder for converted weights (${CACHE_DIR_VARIABLE})")
    up.add_argument(
        "--auth-token-file", type=Path, metavar="FILE", help="make the router require the bearer token stored in this file"
    )
    up.add_argument(
        "--compile-decode", action="store_true",
        help="start the decode worker with --compile-decode (it compiles for a minute or more before serving)",
    )
    up.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto", help=KV_DTYPE_HELP)
    up.add_argument("--decode-weights", choices=WEIGHT_CHOICES, default="model", help=WEIGHTS_HELP.format("decode step's"))
    up.add_argument("--prefill-weights", choices=WEIGHT_CHOICES, default="model", help=WEIGHTS_HELP.format("prefill's"))


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"invalid prompt file {args.prompt_file}: not UTF-8 ({error.reason})") from error
    else:
        text = args.prompt
    if args.question:
        text = f"{text.rstrip()}\n\n{args.question}"
    return text


def run_generate_local(args: argparse.Namespace) -> int:
    compression = None if args.no_compress else CompressionConfig(
        window=args.window, budget=args.budget, kernel=args.kernel, pooling=args.pooling
    )
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    prompt = read_prompt(args)

    # Imported only now, so that `--help` and invalid arguments do not pay for importing torch.
    from snapkv.engine import AUTO_KV_DTYPE, Engine, Request
    from snapkv.model import resolve_model
    from snapkv.text import prompt_ids

    # The decode worker's default cache dtype, so that --local decodes as the services do.
    engine = Engine(resolve_model(args.model or DEFAULT_MODEL_SPEC, cache_dir=args.cache_dir), kv_dtype=AUTO_KV_DTYPE)

    start = time.perf_counter()
    request = Request("local", tuple(prompt_ids(engine.tokenizer, prompt, raw=args.raw)), sampling, compression)
    engine.check_request(request)
    [result] = engine.prefill([request])
    first_token_at = time.perf_counter()

    pieces = []
    for event in engine.decode([result]):
        pieces.append(event.text)
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        finish_reason = event.finish_reason
    end = time.perf_counter()

    cache = result.cache
    num_tokens = len(pieces)
    summary = Summary(
        prompt_tokens=cache.prompt_length,
        kept_tokens=cache.kept_length,
        compression_ratio=round(cache.compression_ratio, 4),
        kv_bytes_full=cache.full_size_bytes(),
        kv_bytes_kept=cache.num_bytes,
        ttft_s=round(first_token_at - start, 4),
        tpot_s=round((end - first_token_at) / (num_tokens - 1), 4) if num_tokens > 1 else None,
        finish_reason=finish_reason,
        text="".join(pieces),
    )
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print()
        print(format_figures(summary), file=sys.stderr)
    return 0


def format_figures(summary: Summary) -> str:
    tpot = "n/a" if summary.tpot_s is None else f"{summary.tpot_s * 1000:.1f} ms"
    return (
        f"prompt {summary.prompt_tokens} tokens -> kept {summary.kept_tokens} per head "
        f"(compression {summary.compression_ratio:.2f}x); "
        f"KV {summary.kv_bytes_full / 2**20:.1f} MiB -> {summary.kv_bytes_kept / 2**20:.1f} MiB; "
        f"TTFT {summary.ttft_s:.2f} s; TPOT {tpot}; finish: {summary.finish_reason}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "cache_dir", None) is None and os.environ.get(CACHE_DIR_VARIABLE):
        args.cache_dir = Path(os.environ[CACHE_DIR_VARIABLE])
    try:
        cli_security.apply_options(args)
        sends_to_router = args.command == "generate" and not args.local
        if sends_to_router and args.auth_token is None and os.environ.get(AUTH_TOKEN_VARIABLE):
            args.auth_token = os.environ[AUTH_TOKEN_VARIABLE]
        return dispatch(args)
    except KeyboardInterrupt:
        print("snapkv-serve: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        report_error(str(error))
    except CommandError as error:
        report_error(str(error))
    except Exception as error:  # a bug or a library failure: still one line, with the type for a bug report
        logger.debug("unexpected failure", exc_info=True)
        report_error(f"{type(error).__name__}: {error} (rerun with --log-level DEBUG for the traceback)")
    return 1


def dispatch(args: argparse.Namespace) -> int:
    from snapkv import cli_services

    if args.command == "generate" and args.local:
        return run_generate_local(args)
    if args.command == "generate":
        return cli_services.run_generate_target(args)
    handlers = {
        "decode": cli_services.run_decode,
        "prefill": cli_services.run_prefill,
        "router": cli_services.run_router,
        "up": cli_services.run_up,
        "demo": cli_services.run_demo,
    }
    return handlers[args.command](args)


def report_error(message: str) -> None:
    """Print one line on stderr, whatever the message contains."""
    print("snapkv-serve: error: " + " ".join(message.split()), file=sys.stderr)


if __name__ == "__main__":
    # Run the imported module's main: other modules raise snapkv.cli.CommandError, which is not this
    # __main__ module's class, so `python -m snapkv.cli` would report it as an unexpected failure.
    from snapkv.cli import main as module_main

    sys.exit(module_main())
