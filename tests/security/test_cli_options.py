"""Command-line options. The TLS and token flags: incomplete combinations and unreadable files fail at
once, with one line naming the flag or the file, before any model loads. Also the options `up` passes
to its services, and the decode worker's cache dtype."""

import pytest
import torch

from snapkv import cli, cli_services
from snapkv.cli_security import apply_options, read_token_file
from snapkv.config import WEIGHT_CHOICES
from snapkv.engine import WEIGHT_DTYPES
from snapkv.transport import ChannelTLS, ServerTLS
from tests.security.certs import make_authority, make_leaf

GENERATE = ["generate", "--target", "127.0.0.1:1", "--prompt", "x"]
ROUTER = ["router", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"]


@pytest.fixture
def files(tmp_path):
    ca = make_authority(tmp_path, "ca")
    leaf = make_leaf(ca, tmp_path, "leaf")
    return {"ca": str(ca.cert_file), "cert": str(leaf.cert_file), "key": str(leaf.key_file), "folder": tmp_path}


def parse(argv):
    args = cli.build_parser().parse_args(argv)
    apply_options(args)
    return args


def run_cli(argv, capsys):
    status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["decode", "--tls-cert", "a.crt"], "--tls-cert and --tls-key go together"),
        (["decode", "--tls-client-ca", "ca.crt"], "--tls-client-ca requires --tls-cert and --tls-key"),
        (["prefill", "--peer-tls-name", "decode.svc"], "--peer-tls-name requires --peer-ca"),
        (GENERATE + ["--tls-key", "k"], "--tls-cert and --tls-key go together"),
        (GENERATE + ["--tls-server-name", "a"], "--tls-server-name requires"),
    ],
)
def test_incomplete_flags_fail(capsys, argv, message):
    status, err = run_cli(argv, capsys)
    assert status == 1
    assert message in err


def test_missing_certificate_file_fails(capsys, files):
    status, err = run_cli(["decode", "--tls-cert", "/nonexistent/decode.crt", "--tls-key", files["key"]], capsys)
    assert status == 1
    assert "could not read the TLS certificate file /nonexistent/decode.crt" in err


def test_non_pem_file_fails(capsys, files):
    garbage = files["folder"] / "garbage.crt"
    garbage.write_text("not a certificate")
    status, err = run_cli(ROUTER + ["--peer-ca", str(garbage)], capsys)
    assert status == 1
    assert f"invalid CA certificate file {garbage}: expected PEM text" in err


def test_empty_token_file_fails(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(empty)


def test_service_flags_become_tls_settings(files):
    args = parse([
        "prefill", "--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-client-ca", files["ca"],
        "--peer-ca", files["ca"], "--peer-tls-name", "decode.snapkv.svc",
    ])
    assert args.tls == ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)
    assert args.peer_tls == ChannelTLS(args.peer_ca, args.tls_cert, args.tls_key, "decode.snapkv.svc")
    assert args.auth_token is None


def test_no_flags_keep_plaintext(files):
    for argv in (["decode"], ROUTER, GENERATE):
        args = parse(argv)
        assert args.tls is None
        assert args.peer_tls is None
        assert args.auth_token is None


def test_client_flags_and_token(files):
    token_file = files["folder"] / "token"
    token_file.write_text("  abc123  \n")
    args = parse(GENERATE + ["--tls-ca", files["ca"], "--auth-token-file", str(token_file)])
    assert args.tls == ChannelTLS(args.tls_ca)
    assert args.auth_token == "abc123"


def dispatched_args(monkeypatch, argv):
    """Run `cli.main(argv)` up to the command handler; return the namespace the handler would get."""
    dispatched = []

    def record(args):
        dispatched.append(args)
        return 0

    monkeypatch.setattr(cli, "dispatch", record)
    assert cli.main(argv) == 0
    return dispatched[0]


def test_token_variable_used_by_generate(monkeypatch):
    monkeypatch.setenv(cli.AUTH_TOKEN_VARIABLE, "from-environment")
    args = dispatched_args(monkeypatch, GENERATE)
    assert args.auth_token == "from-environment"


def test_token_file_beats_variable(monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    monkeypatch.setenv(cli.AUTH_TOKEN_VARIABLE, "from-environment")
    args = dispatched_args(monkeypatch, GENERATE + ["--auth-token-file", str(token_file)])
    assert args.auth_token == "from-file"


def up_stack(monkeypatch, options):
    """Return the LocalStack that `up` builds with these options, stopped before any process starts."""
    stacks = []

    class RecordingStack(cli_services.LocalStack):
        def start(self, timeout_s=0):
            stacks.append(self)
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_services, "LocalStack", RecordingStack)
    monkeypatch.setattr(cli_services.signal, "signal", lambda signum, handler: None)  # keep pytest's handlers
    assert cli.main(["up", "--model", "tiny-llama", *options]) == 130
    [stack] = stacks
    return stack


def test_up_passes_compile_flag_to_decode(monkeypatch):
    plain = up_stack(monkeypatch, [])
    compiled = up_stack(monkeypatch, ["--compile-decode"])
    assert "--compile-decode" not in plain.commands["decode"]
    assert "--compile-decode" in compiled.commands["decode"]
    assert "--compile-decode" not in compiled.commands["prefill"] + compiled.commands["router"]


@pytest.mark.parametrize(
    ("option", "default", "value", "service"),
    [("--kv-dtype", "auto", "fp16", "decode"), ("--decode-weights", "model", "bf16", "decode"),
     ("--prefill-weights", "model", "bf16", "prefill")],
)
def test_up_passes_dtype_options_to_their_service(monkeypatch, option, default, value, service):
    def given(command):
        return command[command.index(option) + 1]

    assert given(up_stack(monkeypatch, []).commands[service]) == default
    commands = up_stack(monkeypatch, [option, value]).commands
    assert given(commands[service]) == value
    others = [name for name in ("decode", "prefill", "router") if name != service]
    assert option not in commands[others[0]] + commands[others[1]]


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ([], torch.float16),
        (["--kv-dtype", "model"], torch.float32),
        (["--kv-dtype", "bf16"], torch.bfloat16),
        (["--kv-dtype", "fp32"], torch.float32),
    ],
)
def test_decode_kv_dtype_option(option, expected):
    # tiny-llama is an fp32 Llama model, so "auto", the default, stores its cache in fp16.
    engine = cli_services.decode_engine(parse(["decode", "--model", "tiny-llama", "--device", "cpu", *option]))
    assert engine.kv_dtype == expected


def test_weight_choices_map_to_dtypes():
    assert tuple(WEIGHT_DTYPES) == WEIGHT_CHOICES


@pytest.mark.parametrize(("option", "expected"), [([], torch.float32), (["--decode-weights", "bf16"], torch.bfloat16)])
def test_decode_weights_option(option, expected):
    engine = cli_services.decode_engine(parse(["decode", "--model", "tiny-llama", "--device", "cpu", *option]))
    assert engine.weight_dtype == expected
    assert engine._llama_step.qkv_proj[0].packed_weight.dtype == expected


def test_up_passes_token_file_to_router(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("t")
    stack = up_stack(monkeypatch, ["--auth-token-file", str(token_file)])
    router = stack.commands["router"]
    assert router[router.index("--auth-token-file") + 1] == str(token_file)
    assert "--auth-token-file" not in stack.commands["decode"] + stack.commands["prefill"]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", ":50051"])
def test_addresses_need_a_port(capsys, address):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--target", address, "--prompt", "x"])
    assert exit_info.value.code == 2
    assert f"invalid address '{address}': expected HOST:PORT with a port from 1 to 65535" in capsys.readouterr().err


def test_unreachable_router_names_a_next_step(capsys):
    # Nothing listens on this loopback port: the one-line error names what to check.
    port = cli_services.free_port()
    status, err = run_cli(["generate", "--target", f"127.0.0.1:{port}", "--prompt", "x", "--timeout", "5"], capsys)
    assert status == 1
    assert f"request to 127.0.0.1:{port} failed with UNAVAILABLE" in err
    assert f"check that a router listens on 127.0.0.1:{port}" in err


def test_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(ValueError, match=f"invalid model '{missing}': no such folder"):
        cli_services.decode_engine(parse(["decode", "--model", str(missing), "--device", "cpu"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_named():
    with pytest.raises(ValueError, match="invalid device 'cuda': this PyTorch build sees no CUDA device"):
        cli_services.decode_engine(parse(["decode", "--model", "tiny-llama", "--device", "cuda"]))


def test_bf16_weights_need_the_cpu(capsys):
    with pytest.raises(ValueError, match="invalid --decode-weights bf16 on cuda: packed bf16 weights need the CPU"):
        cli_services.decode_engine(parse(["decode", "--model", "tiny-llama", "--device", "cuda", "--decode-weights", "bf16"]))
    status, err = run_cli(["prefill", "--model", "tiny-llama", "--prefill-weights", "bf16", "--gpus-per-actor", "1"], capsys)
    assert status == 1
    assert "invalid --prefill-weights bf16 with --gpus-per-actor 1.0: packed bf16 weights need the CPU" in err
