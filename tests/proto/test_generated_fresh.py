"""The checked-in modules in snapkv/proto/ match what proto/generate.py makes from the .proto files now."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED_DIR = REPO_ROOT / "snapkv" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
REGENERATE = "python proto/generate.py"


@pytest.fixture(scope="module")
def fresh_dir(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("generated")
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--output-dir", str(output)],
        check=True,
        capture_output=True,
        text=True,
    )
    return output


def generated_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(GENERATED_SUFFIXES))


def test_generated_file_set_is_current(fresh_dir):
    assert generated_names(fresh_dir) == ["serving_pb2.py", "serving_pb2.pyi", "serving_pb2_grpc.py"]
    assert generated_names(GENERATED_DIR) == generated_names(fresh_dir), f"stale files: run {REGENERATE}"


def test_generated_files_are_current(fresh_dir):
    for name in generated_names(fresh_dir):
        checked_in = GENERATED_DIR / name
        assert checked_in.read_text() == (fresh_dir / name).read_text(), f"{checked_in} is stale: run {REGENERATE}"


def test_grpc_module_imports_its_messages_from_the_package():
    from snapkv.proto import serving_pb2, serving_pb2_grpc

    assert serving_pb2_grpc.snapkv_dot_serving_dot_v1_dot_serving__pb2 is serving_pb2
    assert serving_pb2.DESCRIPTOR.name == "snapkv/serving/v1/serving.proto"
    assert serving_pb2.DESCRIPTOR.package == "snapkv.serving.v1"
    assert sorted(serving_pb2.DESCRIPTOR.services_by_name) == ["Decode", "Prefill", "Router"]
