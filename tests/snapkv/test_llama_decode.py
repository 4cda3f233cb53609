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


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_narrow_cache_dtype(family, kv_dtype):
    # The same steps as the generic forward on an fp32 cache, with keys and values stored in `kv_dtype`:
    # the logits differ by that dtype's rounding only, and the cache stores `kv_dtype`.
    engine = Engine(tiny_model(family, **FAMILY_SHAPES[family]), kv_dtype=kv_dtype)
    assert engine.kv_dtype == kv_dtype
    lengths, compression = [70, 33, 120], CompressionConfig(window=8, budget=48, kernel=5)
    requests = [
        Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=STEPS + 1), compression)
        for seed, length in enumerate(lengths)
    ]
    caches = [result.cache for result in engine.prefill(requests)]
    narrow = BatchCache(caches, STEPS + 1, kv_dtype)
    reference = BatchCache(caches, STEPS + 1)
    assert reference.dtype == torch.float32
    for narrow_layer, layer in zip(narrow.layers, reference.layers):
        assert torch.equal(narrow_layer.keys, layer.keys.to(kv_dtype))
        assert torch.equal(narrow_layer.values, layer.values.to(kv_dtype))
    tokens = torch.randint(0, 256, (STEPS, len(lengths)), generator=torch.Generator().manual_seed(5))
    tolerance = 2e-3 if kv_dtype == torch.float16 else 2e-2
    for step_tokens in tokens:
        logits = engine.decode_step(narrow, step_tokens)
        expected = engine.forward_step(reference, step_tokens).float()
        reference.advance()
        torch.testing.assert_close(logits, expected, rtol=0, atol=tolerance)
    # Each step wrote its keys and values into the narrow cache, close to the reference's.
    for narrow_layer, layer in zip(narrow.layers, reference.layers):
        assert narrow_layer.keys.dtype == narrow_layer.values.dtype == kv_dtype
        torch.testing.assert_close(narrow_layer.keys.float(), layer.keys, rtol=0, atol=tolerance * 10)
        torch.testing.assert_close(narrow_layer.values.float(), layer.values, rtol=0, atol=tolerance * 10)


def test_narrow_cache_needs_the_llama_step():
    def engine(**options):
        return Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), **options)

    with pytest.raises(ValueError, match="invalid kv_dtype=torch.float16: .*llama_decode=False"):
        engine(llama_decode=False, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="invalid kv_dtype=torch.int8: expected a floating-point dtype"):
        engine(kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="invalid kv_dtype='fp16': expected a torch dtype, None or 'auto'"):
        engine(kv_dtype="fp16")
    # "auto": fp16 where the Llama step decodes an fp32 model, the model's dtype where it does not.
    assert engine(kv_dtype="auto").kv_dtype == torch.float16
    assert engine(kv_dtype="auto", llama_decode=False).kv_dtype == torch.float32
    assert engine().kv_dtype == torch.float32


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


def test_compiled_step_with_fp16_cache_matches_eager(fresh_compiler):
    # Real compilation with the cache in fp16: the same logits as the eager step on the same fp16
    # caches, for a masked batch and a single row, and no compiling after the warm-up.
    compiled = Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), compile_decode=True, kv_dtype=torch.float16)
    eager = Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), kv_dtype=torch.float16)
    compiled.warm_up_decode(batch_size=3, kept_positions=48)
    compression = CompressionConfig(window=8, budget=48, kernel=5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([70, 33, 120], [90]):
            requests = [
                Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=STEPS + 1), compression)
                for seed, length in enumerate(lengths)
            ]
            caches = [result.cache for result in eager.prefill(requests)]
            compiled_cache = BatchCache(caches, STEPS + 1, torch.float16)
            eager_cache = BatchCache(caches, STEPS + 1, torch.float16)
            tokens = torch.randint(0, 256, (STEPS, len(lengths)), generator=torch.Generator().manual_seed(9))
            for step_tokens in tokens:
                torch.testing.assert_close(
                    compiled.decode_step(compiled_cache, step_tokens), eager.decode_step(eager_cache, step_tokens),
                    rtol=1e-3, atol=1e-3,
                )


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


def bf16_and_fp32_logits(family: str, compile_decode: bool = False):
    """Decode the same teacher-forced steps with bf16 decode weights and with fp32 ones; return both logits."""
    fp32 = Engine(tiny_model(family, **FAMILY_SHAPES[family]))
    bf16 = Engine(tiny_model(family, **FAMILY_SHAPES[family]), weight_dtype=torch.bfloat16, compile_decode=compile_decode)
    if compile_decode:
        bf16.warm_up_decode(batch_size=3, kept_positions=48)
    results = []
    # After a warm-up, no step may compile again.
    with torch._dynamo.config.patch(error_on_recompile=compile_decode):
        for lengths in ([70, 33, 120], [90]):
            results += teacher_forced_pairs(bf16, fp32, lengths)
    return bf16, results


def teacher_forced_pairs(bf16: Engine, fp32: Engine, lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return (bf16 logits, fp32 logits) of each of STEPS teacher-forced steps from the same compressed prefill."""
    requests = [
        Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=STEPS + 1),
                CompressionConfig(window=8, budget=48, kernel=5))
        for seed, length in enumerate(lengths)
    ]
    caches = [result.cache for result in fp32.prefill(requests)]
    bf16_cache, fp32_cache = BatchCache(caches, STEPS + 1), BatchCache(caches, STEPS + 1)
    tokens = torch.randint(0, 256, (STEPS, len(lengths)), generator=torch.Generator().manual_seed(7))
    return [(bf16.decode_step(bf16_cache, step), fp32.decode_step(fp32_cache, step)) for step in tokens]


@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_bf16_decode_weights(family):
    # Every product of the decoder layers reads bf16 weights, the vocabulary projection fp32 ones.
    # Logits differ from the fp32 step by bf16 rounding.
    engine, results = bf16_and_fp32_logits(family)
    step = engine._llama_step
    assert engine.weight_dtype == torch.bfloat16
    layers = engine.model.model.layers
    products = step.qkv_proj + step.gate_up_proj + [layer.self_attn.o_proj for layer in layers]
    products += [layer.mlp.down_proj for layer in layers]
    assert {product.packed_weight.dtype for product in products} == {torch.bfloat16}
    assert engine.model.lm_head.packed_weight.dtype == torch.float32
    for bf16_logits, fp32_logits in results:
        assert bf16_logits.dtype == torch.float32
        assert not torch.allclose(bf16_logits, fp32_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bf16_logits, fp32_logits, rtol=0, atol=5e-2)


def test_compiled_step_with_bf16_decode_weights(fresh_compiler):
    # Real compilation: a batch and a single row (which takes the bf16 packed products too, not generated
    # fp32 ones) stay as close to the fp32 eager step as the eager bf16 step does, with no compiling after
    # the warm-up.
    _, results = bf16_and_fp32_logits("llama", compile_decode=True)
    for bf16_logits, fp32_logits in results:
        assert not torch.allclose(bf16_logits, fp32_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bf16_logits, fp32_logits, rtol=0, atol=5e-2)


def test_bf16_weights_rejected_without_packing():
    with pytest.raises(ValueError, match="invalid weight_dtype=torch.bfloat16: only packed weights take another dtype"):
        Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), weight_dtype=torch.bfloat16, pack_weights=False)
    with pytest.raises(ValueError, match="invalid weight_dtype=torch.bfloat16 without join_projections"):
        LlamaDecodeStep(tiny_model("llama", **FAMILY_SHAPES["llama"]).model, weight_dtype=torch.bfloat16)
    assert Engine(tiny_model("llama", **FAMILY_SHAPES["llama"])).weight_dtype == torch.float32


@pytest.mark.parametrize("llama_decode", [True, False])
def test_bf16_weights_in_prefill_and_generic_forward(llama_decode):
    # Prefill and either decode path run through the model's own layers, packed in bf16. The first
    # token's logits and the kept keys differ from the fp32 engine's by bf16 rounding only, because
    # these prompts keep the same positions in both. Greedy decoding then runs to the end.
    bf16 = Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]), weight_dtype=torch.bfloat16, llama_decode=llama_decode)
    fp32 = Engine(tiny_model("llama", **FAMILY_SHAPES["llama"]))
    requests = [Request(str(seed), prompt(length, seed), SamplingParams(max_tokens=STEPS + 1),
                        CompressionConfig(window=8, budget=48, kernel=5)) for seed, length in [(1, 120), (2, 40)]]
    for narrow, reference in zip(bf16.prefill(requests), fp32.prefill(requests)):
        assert not torch.allclose(narrow.logits, reference.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(narrow.logits, reference.logits, rtol=0, atol=5e-2)
        # None for the prompt shorter than the budget, which is kept whole.
        for narrow_positions, reference_positions in zip(narrow.kept_positions, reference.kept_positions):
            both_whole = narrow_positions is None and reference_positions is None
            assert both_whole or torch.equal(narrow_positions, reference_positions)
        torch.testing.assert_close(narrow.cache.keys, reference.cache.keys, rtol=0, atol=5e-2)
    events = list(bf16.generate(requests))
    assert {event.index for event in events if event.finish_reason} == {0, 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engine_on_a_narrow_model(dtype):
    # A model loaded in bf16 or fp16 packs nothing and decodes through the Llama step in its own dtype.
    loaded = tiny_model("llama", **FAMILY_SHAPES["llama"])
    loaded.model.to(dtype)
    engine = Engine(loaded)
    assert engine.weight_dtype == dtype
    assert engine.packed_layers == 0
    assert engine.decode_path == "llama"
    request = Request("n", prompt(120, 1), SamplingParams(max_tokens=STEPS), CompressionConfig(window=8, budget=48, kernel=5))
    events = list(engine.generate([request]))
    assert events[-1].finish_reason in ("stop", "length")
