"""`snapkv-serve generate --local` as a user runs it: a real subprocess on a tiny model saved to disk."""

import json
import subprocess
import sys

import pytest

from snapkv.tiny_models import tiny_model

SUMMARY_KEYS = [
    "prompt_tokens",
    "kept_tokens",
    "compression_ratio",
    "kv_bytes_full",
    "kv_bytes_kept",
    "ttft_s",
    "tpot_s",
    "finish_reason",
    "text",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    loaded = tiny_model("llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "snapkv.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_json_output(model_dir):
    prompt = "x" * 300
    result = run_cli(
        "generate", "--local", "--model", str(model_dir), "--prompt", prompt,
        "--budget", "60", "--window", "8", "--max-tokens", "5", "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert list(summary) == SUMMARY_KEYS
    # The byte tokenizer makes one token per character; the tiny model has 2 layers, 2 KV heads, head dim 16.
    assert summary["prompt_tokens"] == 300
    assert summary["kept_tokens"] == 60
    assert summary["compression_ratio"] == 5.0
    assert summary["kv_bytes_full"] == 2 * 2 * 2 * 300 * 16 * 4
    assert summary["kv_bytes_kept"] == 2 * 2 * 2 * 60 * 16 * 4
    assert summary["finish_reason"] == "length"
    assert summary["ttft_s"] > 0


def test_streams_text_without_json(model_dir, tmp_path):
    document = tmp_path / "doc.txt"
    document.write_text("some document text " * 10)
    result = run_cli(
        "generate", "--local", "--model", str(model_dir), "--prompt-file", str(document),
        "--question", "why?", "--no-compress", "--max-tokens", "4",
    )
    assert result.returncode == 0, result.stderr
    assert "compression 1.00x" in result.stderr
    # 189 characters of document after trailing spaces are stripped, a blank line, then "why?".
    assert "prompt 195 tokens -> kept 195 per head" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "4", "--window", "8"], "invalid budget=4"),
        (["--kernel", "4"], "invalid kernel=4"),
        (["--top-p", "0"], "invalid top_p=0.0"),
        (["--max-tokens", "0"], "invalid max_tokens=0"),
        (["--prompt-file", "/nonexistent/prompt.txt"], "No such file"),
    ],
)
def test_errors_are_one_line(model_dir, args, message):
    source = [] if "--prompt-file" in args else ["--prompt", "hello"]
    result = run_cli("generate", "--local", "--model", str(model_dir), *source, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
