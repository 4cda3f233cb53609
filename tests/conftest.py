"""Shared fixtures: tiny random-weight models of each family, and the embedded model (loaded once)."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.utils

from snapkv.engine import Engine
from snapkv.tiny_models import tiny_model

# One GQA shape per family, so that group sizes 2, 3 and 4 are all covered.
FAMILY_SHAPES = {
    "llama": dict(num_heads=4, num_kv_heads=2),
    "mistral": dict(num_heads=8, num_kv_heads=2),
    "qwen2": dict(num_heads=6, num_kv_heads=2),
}


def tiny_engine(family: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **engine_options) -> Engine:
    return Engine(tiny_model(family, seed=seed, attn_implementation=attn_implementation, **FAMILY_SHAPES[family]), **engine_options)


@pytest.fixture
def fresh_compiler():
    """torch.compile's caches start empty and end empty. A process serves one engine, but tests build
    many, and torch.compile compiles one function for a bounded number of them. Inductor's in-memory
    code caches are cleared too: they keep a kernel whose build failed, and a later test that
    generates the same kernel source would get that failure again."""
    torch._dynamo.reset()
    torch._inductor.utils.clear_caches()
    yield
    torch._dynamo.reset()
    torch._inductor.utils.clear_caches()


@pytest.fixture(scope="session")
def real_engine() -> Engine:
    from snapkv.model import load_model

    return Engine(load_model())
