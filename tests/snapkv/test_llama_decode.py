"""`LlamaDecodeStep` against the model's generic forward: the same logits, step after step, for every
supported family, with rows of equal and of different lengths (the masked case)."""

import pytest
import torch

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Engine, Request
from snapkv.kv_cache import BatchCache
from snapkv.llama_decode import LlamaDecodeStep, unsupported_reason
from snapkv.tiny_models import tiny_model
from tests.conftest import FAMILY_SHAPES

STEPS = 6


def prompt(length: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(0, 256, (length,), generator=generator).tolist())


def both_paths_logits(engine: Engine, lengths: list[int], compression: CompressionConfig | None):
    """Decode STEPS teacher-forced tokens from the same prefill along both paths; return both logits [STEPS, batch, vocab]."""
    requests = [
        Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=STEPS + 1), compression)
        for seed, length in enumerate(lengths)
    ]
    results = engine.prefill(requests)
    llama_cache = BatchCache([result.cache for result in results], STEPS + 1)
    generic_cache = BatchCache([result.cache for result in results], STEPS + 1)
    generator = torch.Generator().manual_seed(len(lengths))
    tokens = torch.randint(0, 256, (STEPS, len(lengths)), generator=generator)

    llama, generic = [], []
    for step_tokens in tokens:
        llama.append(engine.decode_step(llama_cache, step_tokens))
        generic.append(engine.forward_step(generic_cache, step_tokens).float())
        generic_cache.advance()
    return torch.stack(llama), torch.stack(generic)


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
@pytest.mark.parametrize(
    "lengths, compression",
    [
        ([40, 40, 40], None),  # equal rows: no mask
        ([70, 33, 120], CompressionConfig(window=8, budget=48, kernel=5)),  # kept lengths 48, 33, 48
        ([90, 17], None),
    ],
)
@pytest.mark.parametrize("pack_weights", [True, False])  # with joined q/k/v and gate/up products, and without
def test_same_logits_as_generic_forward(family, lengths, compression, pack_weights):
    engine = Engine(tiny_model(family, **FAMILY_SHAPES[family]), pack_weights=pack_weights)
    assert engine.decode_path == "llama"
    assert (engine._llama_step.qkv_proj is not None) == pack_weights

    llama, generic = both_paths_logits(engine, lengths, compression)

    torch.testing.assert_close(llama, generic, rtol=1e-5, atol=1e-5)
    assert torch.equal(llama.argmax(-1), generic.argmax(-1))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_same_greedy_tokens_for_both_paths(attn_implementation):
    ids = prompt(150, seed=3)
    request = Request("a", ids, SamplingParams(max_tokens=24), CompressionConfig(window=8, budget=48, kernel=5))
    paths = {}
    for llama_decode in (True, False):
        engine = Engine(tiny_model("llama", attn_implementation=attn_implementation, **FAMILY_SHAPES["llama"]), llama_decode=llama_decode)
        paths[engine.decode_path] = [event.token_id for event in engine.generate([request])]
    # This prompt's greedy continuation meets a stop token after 7 tokens: 6 decode steps on each path.
    assert len(paths["llama"]) == 7
    assert paths["llama"] == paths["generic"]


def test_real_model_same_logits(real_engine):
    assert real_engine.decode_path == "llama"
    llama, generic = both_paths_logits(real_engine, [300, 180], CompressionConfig(window=16, budget=128, kernel=7))
    torch.testing.assert_close(llama, generic, rtol=1e-4, atol=1e-4)
    assert torch.equal(llama.argmax(-1), generic.argmax(-1))


def test_unsupported_family_rejected():
    loaded = tiny_model("mistral", **FAMILY_SHAPES["mistral"])
    loaded.model.config.model_type = "gpt2"
    assert "is not one of" in unsupported_reason(loaded.model)
    with pytest.raises(ValueError, match="does not support this model"):
        LlamaDecodeStep(loaded.model)
    assert Engine(loaded).decode_path == "generic"


# Qwen2's q, k and v have biases, which a one-row compiled step adds to its generated products.
@pytest.mark.parametrize(("family", "pack_weights"), [("llama", True), ("llama", False), ("qwen2", True)])
def test_compiled_step_matches_without_recompiling(fresh_compiler, family, pack_weights):
    # Real compilation by inductor (C++ kernels built with the machine's compiler) of a two-layer model.
    engine = Engine(tiny_model(family, **FAMILY_SHAPES[family]), pack_weights=pack_weights, compile_decode=True)
    engine.warm_up_decode(batch_size=3, kept_positions=48)
    # After the warm-up, no batch below may compile again: rows of one length, of different lengths
    # (a mask), a single row, and lengths the warm-up never saw.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths, compression in [
            ([70, 33, 120], CompressionConfig(window=8, budget=48, kernel=5)),
            ([40, 40, 40], None),
            ([90, 17], None),
            ([64], None),
        ]:
            compiled, generic = both_paths_logits(engine, lengths, compression)
            torch.testing.assert_close(compiled, generic, rtol=1e-4, atol=1e-4)
            assert torch.equal(compiled.argmax(-1), generic.argmax(-1))


def test_compile_needs_the_llama_step():
    with pytest.raises(ValueError, match="invalid compile_decode=True: .*llama_decode=False"):
        Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), llama_decode=False, compile_decode=True)


def test_compiling_traces_each_graph_once(fresh_compiler):
    # Dynamo traces a graph again from the start when a float it traced as a symbolic input must be a
    # constant (RMSNorm's epsilon, attention's scaling). It records that as `compile_attempt_1` in
    # `compilation_time_metrics`, its internal record of phase times, which no public API exposes.
    metrics = torch._dynamo.utils.compilation_time_metrics
    metrics.clear()
    engine = Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), compile_decode=True)
    engine.warm_up_decode(batch_size=3, kept_positions=48)
    assert "compile_attempt_0" in metrics
    assert "compile_attempt_1" not in metrics
