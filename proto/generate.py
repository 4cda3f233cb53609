"""Regenerate the Python modules for every .proto file under proto/ into snapkv/proto/.

Usage: python proto/generate.py [--output-dir DIR]     (needs grpcio-tools, pinned in the test extras)

protoc names each generated module after its .proto path, so snapkv/serving/v1/serving.proto would
become the module `snapkv.serving.v1.serving_pb2`, and the generated `serving_pb2_grpc.py` imports it
under that name. No such package exists here: the modules are generated into a temporary folder, moved
flat into snapkv/proto/, and their imports are rewritten to `from snapkv.proto import ...`. The
descriptors keep the .proto path as their file name, so gRPC reflection still shows the source path.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUTPUT = REPO_ROOT / "snapkv" / "proto"
TARGET_PACKAGE = "snapkv.proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Return the .proto sources relative to proto/, sorted."""
    return sorted(path.relative_to(PROTO_ROOT) for path in PROTO_ROOT.rglob("*.proto"))


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def run_protoc(sources: list[Path], output_dir: Path) -> None:
    """Run protoc from grpcio-tools on `sources` (paths relative to proto/), writing into `output_dir`."""
    well_known = resources.files("grpc_tools") / "_proto"
    arguments = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={output_dir}",
        f"--pyi_out={output_dir}",
        f"--grpc_python_out={output_dir}",
        *(str(source) for source in sources),
    ]
    status = protoc.main(arguments)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status} on {', '.join(map(str, sources))}")


def rewrite_imports(text: str, source_packages: set[str]) -> str:
    """Point imports of the generated modules at `snapkv.proto`, where they are moved."""
    for package in source_packages:
        text = re.sub(rf"^from {re.escape(package)} import ", f"from {TARGET_PACKAGE} import ", text, flags=re.M)
    return text


def generate(output_dir: Path = DEFAULT_OUTPUT) -> list[Path]:
    """Generate the modules of every .proto file into `output_dir`; return the paths written."""
    sources = proto_files()
    if not sources:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    source_packages = {".".join(source.parent.parts) for source in sources}

    written: list[Path] = []
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        run_protoc(sources, Path(scratch))

        # Move every module flat into the output folder; two sources with one file name would collide.
        for path in sorted(Path(scratch).rglob("*")):
            if not is_generated(path):
                continue
            target = output_dir / path.name
            if target in written:
                raise RuntimeError(f"two .proto files generate {path.name}; give them distinct file names")
            target.write_text(rewrite_imports(path.read_text(), source_packages))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"folder that receives the generated modules (default: {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})",
    )
    arguments = parser.parse_args(argv)
    for path in generate(arguments.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
