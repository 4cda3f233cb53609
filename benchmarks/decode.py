"""Decode speed on the embedded model: time per output token against prompt length, tokens per
second against Hugging Face transformers' own `generate`, and the memory-bandwidth bound.

    .venv/bin/python -m benchmarks.decode [--quick]

Decode time depends on the cache's shape, not its values. So each case decodes from caches of random
keys and values with the right shape and original positions, and no prefill runs. Both sides decode
greedily and never stop early, and neither detokenizes.

The engine stores its cache as the decode worker does by default: in fp16 for this fp32 model
(`Engine(kv_dtype="auto")`). Transformers' caches are fp32.

- Time per output token (batch 1) for prompts of 1K to 8K tokens: the engine with a SnapKV cache
  of `--budget` positions per KV head, and with the full prompt cache.
- Tokens per second at batch 1, 4 and 8 on 4K-token prompts: the engine with a SnapKV cache, against
  `model.generate` with transformers' `DynamicCache` of the full prompt. A third case gives that
  `DynamicCache` the same compressed cache: the gain of compression alone, without the engine.
  A fourth case keeps the engine's cache in fp32, a fifth runs that through the model's generic
  forward instead of `LlamaDecodeStep`, and a sixth runs `LlamaDecodeStep` compiled by torch.compile
  (`Engine(compile_decode=True)`), warmed up before the rounds; its compile time is reported. The
  last two run the eager and the compiled step with bf16 decode weights
  (`Engine(weight_dtype=torch.bfloat16)`, `snapkv-serve decode --decode-weights bf16`).
  The cases take turns for three rounds (five in the full version), and each reports its median.
- The bandwidth bound: each decode step reads every weight once and every cached key and value once,
  so the step can take no less than those bytes divided by the measured read bandwidth. An fp16
  cache halves the bytes of the keys and values, so its bound is lower.
- The compute bound: a step also multiplies every row by every weight matrix, 2 x batch x weights
  floating-point operations, which take no less than that divided by the measured fp32 matmul rate.
- With bf16 decode weights, both bounds count the decoder layers' products in bf16: half the bytes,
  and the measured bf16 matmul rate. The vocabulary projection stays fp32 in both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from benchmarks.common import markdown_table, progress, write_json
from snapkv.config import dtype_name, head_dim
from snapkv.engine import AUTO_KV_DTYPE, Engine
from snapkv.kv_cache import BatchCache, PromptCache
from snapkv.model import load_model


# The engine's rows. The decode worker's default (`--kv-dtype auto`) stores the fp32 model's cache in fp16.
EAGER = "engine, SnapKV cache in fp16"
EAGER_FP32 = "engine, SnapKV cache in fp32"
COMPILED = "engine, compiled step, SnapKV cache in fp16"
# `--decode-weights bf16`: the decoder layers' products read weights packed in bf16.
BF16 = "engine, bf16 decode weights, SnapKV cache in fp16"
COMPILED_BF16 = "engine, compiled step, bf16 decode weights, SnapKV cache in fp16"

# run()'s arguments for the quick and the full version.
QUICK = dict(lengths=[1024, 8192], batches=[1, 8], budget=512, throughput_length=4096, steps=8, rounds=3)
FULL = dict(lengths=[1024, 2048, 4096, 8192], batches=[1, 4, 8], budget=512, throughput_length=4096, steps=16, rounds=5)


def model_shape(engine: Engine) -> tuple[int, int, int]:
    config = engine.model.config
    return config.num_hidden_layers, config.num_key_value_heads, head_dim(config)


def random_prompt(engine: Engine, kept: int, prompt_length: int, seed: int) -> PromptCache:
    num_layers, num_kv_heads, head_dim = model_shape(engine)
    generator = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_kv_heads, kept, head_dim)
    return PromptCache(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), prompt_length)


def engine_step_seconds(
    engine: Engine, prompts: list[PromptCache], steps: int, kv_dtype: torch.dtype | None = None
) -> float:
    """Return the mean seconds of a greedy decode step over `steps` steps after one warm-up step, with
    the cache in `kv_dtype` (None: the engine's)."""
    # One position more than the steps write: a compiled step compiles again for a full cache.
    cache = BatchCache(prompts, steps + 2, kv_dtype or engine.kv_dtype)
    tokens = torch.zeros(len(prompts), dtype=torch.long)
    tokens = engine.decode_step(cache, tokens).argmax(dim=-1)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = engine.decode_step(cache, tokens).argmax(dim=-1)
    return (time.perf_counter() - start) / steps


class StepClock(StoppingCriteria):
    """Record the time of every generation step; never stops generation."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def transformers_step_seconds(engine: Engine, model, batch: int, cached: int, steps: int) -> float:
    """Return the mean seconds of a `generate` step of `model` (as loaded, without the engine's changes)
    with a `DynamicCache` of `cached` random positions."""
    num_layers, num_kv_heads, head_dim = model_shape(engine)
    generator = torch.Generator().manual_seed(batch)
    cache = DynamicCache(config=model.config)
    for layer in range(num_layers):
        shape = (batch, num_kv_heads, cached, head_dim)
        cache.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), layer)
    # One uncached token: generate runs it as a one-token prefill, then decodes.
    input_ids = torch.zeros((batch, cached + 1), dtype=torch.long)
    clock = StepClock()
    with torch.inference_mode():
        model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
            max_new_tokens=steps + 2, min_new_tokens=steps + 2, do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=engine.pad_id,
        )
    # The first interval follows the one-token prefill: it is a decode step like the others.
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return sum(intervals[-steps:]) / steps


def read_bandwidth(num_bytes: int = 256 << 20, repeats: int = 20) -> float:
    """Return the best measured read bandwidth in bytes/s: summing an fp32 tensor 8x the size of a 32 MiB L3.

    Single sums on the 2-core machine of the benchmarks varied from 31 to 58 GB/s, so the best of many
    is taken: a low reading would make the bound too easy to meet.
    """
    data = torch.ones(num_bytes // 4)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def matmul_rate(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Return the best measured matmul rate in `dtype`, in floating-point operations per second."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def weight_count(module: torch.nn.Module) -> int:
    """Return the weights of the linear layers in `module`: in_features x out_features summed."""
    return sum(
        layer.in_features * layer.out_features
        for layer in module.modules()
        if hasattr(layer, "in_features") and hasattr(layer, "out_features")
    )


def linear_flops(engine: Engine, batch: int) -> tuple[int, int]:
    """Floating-point operations of a decode step's linear layers: (the decoder layers', the vocabulary projection's)."""
    layers = weight_count(engine.model.model.layers)
    return 2 * batch * layers, 2 * batch * (weight_count(engine.model) - layers)


def weight_bytes(engine: Engine) -> int:
    """Bytes of the weights one decode step reads: every parameter, tied ones counted once, with the
    decoder layers' linear weights in `engine.weight_dtype` (bf16 for bf16 decode weights)."""
    seen, total = set(), 0
    for parameter in engine.model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    narrowing = engine.model.dtype.itemsize - engine.weight_dtype.itemsize
    return total - weight_count(engine.model.model.layers) * narrowing


def kv_bytes(engine: Engine, batch: int, positions: int, dtype: torch.dtype) -> int:
    num_layers, num_kv_heads, head_dim = model_shape(engine)
    return 2 * batch * num_layers * num_kv_heads * positions * head_dim * dtype.itemsize


def run(lengths: list[int], batches: list[int], budget: int, throughput_length: int, steps: int, rounds: int) -> dict:
    loaded = load_model()
    # The decode worker's cache dtype. Its rows name it, and the cases below pass fp32 where they need it.
    engine = Engine(loaded, kv_dtype=AUTO_KV_DTYPE)
    # The same modules (already packed) through the model's generic forward, which keeps the model's
    # fp32. Against the fp32 row, it shows what LlamaDecodeStep saves.
    generic = Engine(loaded, llama_decode=False)
    # transformers runs its own copy of the model: the engine packs its linear layers' weights.
    plain_model = load_model().model
    # The compiled engine gets its own copy: an engine on the copy above would find its layers packed and join none.
    compiled = Engine(load_model(), compile_decode=True, kv_dtype=AUTO_KV_DTYPE)
    bf16 = Engine(load_model(), kv_dtype=AUTO_KV_DTYPE, weight_dtype=torch.bfloat16)
    compiled_bf16 = Engine(load_model(), compile_decode=True, kv_dtype=AUTO_KV_DTYPE, weight_dtype=torch.bfloat16)
    progress("decode: compiling the decode step (a few minutes on a 2-core CPU) ...")
    start = time.perf_counter()
    compiled.warm_up_decode(max(batches), budget)
    compile_seconds = time.perf_counter() - start
    progress(f"decode: compiled the decode step in {compile_seconds:.0f} s; compiling it with bf16 decode weights ...")
    compiled_bf16.warm_up_decode(max(batches), budget)
    tpot_cases = [(length, variant, kept) for length in lengths
                  for variant, kept in (("snapkv", min(budget, length)), ("full", length))]
    tpot_samples: dict[tuple, list[float]] = {case: [] for case in tpot_cases}
    for round_index in range(rounds):
        for case in tpot_cases:
            length, variant, kept = case
            tpot_samples[case].append(engine_step_seconds(engine, [random_prompt(engine, kept, length, 0)], steps))
            progress(f"decode: TPOT at {length} tokens, {variant} cache ({kept} kept), round {round_index + 1} of "
                     f"{rounds}: {tpot_samples[case][-1] * 1e3:.1f} ms")
    tpot = []
    for (length, variant, kept), samples in tpot_samples.items():
        tpot.append({"prompt_tokens": length, "cache": variant, "kept": kept, "seconds": statistics.median(samples),
                     "round_seconds": samples})

    bandwidth = read_bandwidth()
    flop_rates = {dtype: matmul_rate(dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    weights = weight_bytes(engine)
    progress(f"decode: read bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {flop_rates[torch.float32] / 1e9:.1f} GFLOP/s "
             f"in fp32 and {flop_rates[torch.bfloat16] / 1e9:.1f} in bf16, weights {weights / 2**20:.0f} MiB "
             f"({weight_bytes(bf16) / 2**20:.0f} MiB with bf16 decode weights)")

    def compute_bound(measured: Engine, batch: int) -> float:
        layers, head = linear_flops(measured, batch)
        return layers / flop_rates[measured.weight_dtype] + head / flop_rates[measured.model.dtype]

    throughput = []
    for batch in batches:
        prompts = [random_prompt(engine, budget, throughput_length, seed) for seed in range(batch)]
        fp32 = torch.float32
        # variant: (measure, cached positions, dtype of the cached keys and values, the engine whose weights it reads)
        cases = {
            EAGER: (lambda: engine_step_seconds(engine, prompts, steps), budget, engine.kv_dtype, engine),
            EAGER_FP32: (lambda: engine_step_seconds(engine, prompts, steps, fp32), budget, fp32, engine),
            "engine with the generic forward, SnapKV cache in fp32": (
                lambda: engine_step_seconds(generic, prompts, steps), budget, fp32, engine),
            COMPILED: (lambda: engine_step_seconds(compiled, prompts, steps), budget, compiled.kv_dtype, engine),
            BF16: (lambda: engine_step_seconds(bf16, prompts, steps), budget, bf16.kv_dtype, bf16),
            COMPILED_BF16: (
                lambda: engine_step_seconds(compiled_bf16, prompts, steps), budget, compiled_bf16.kv_dtype, bf16),
            "transformers generate, full DynamicCache": (
                lambda: transformers_step_seconds(engine, plain_model, batch, throughput_length, steps),
                throughput_length, fp32, engine),
            "transformers generate, compressed DynamicCache": (
                lambda: transformers_step_seconds(engine, plain_model, batch, budget, steps), budget, fp32, engine),
        }
        samples: dict[str, list[float]] = {variant: [] for variant in cases}
        for round_index in range(rounds):
            for variant, (measure, _, _, _) in cases.items():
                samples[variant].append(measure())
            progress(f"decode: batch {batch}, round {round_index + 1} of {rounds}: " + ", ".join(
                f"{variant} {times[-1] * 1e3:.1f} ms" for variant, times in samples.items()))
        for variant, (_, positions, dtype, reader) in cases.items():
            seconds = statistics.median(samples[variant])
            bound = (weight_bytes(reader) + kv_bytes(engine, batch, positions, dtype)) / bandwidth
            computing = compute_bound(reader, batch)
            throughput.append({
                "batch": batch, "variant": variant, "positions": positions, "step_seconds": seconds,
                "round_seconds": samples[variant], "tokens_per_second": batch / seconds, "bound_seconds": bound,
                "x_bound": seconds / bound, "compute_bound_seconds": computing,
                "x_roofline": seconds / max(bound, computing),
            })
            progress(f"decode: batch {batch}, {variant}: {seconds * 1e3:.1f} ms/step, {batch / seconds:.1f} tokens/s, "
                     f"{seconds / bound:.1f}x the bandwidth bound")
    return {
        "budget": budget, "throughput_prompt_tokens": throughput_length, "steps": steps, "rounds": rounds,
        "read_bandwidth_bytes_per_second": bandwidth, "matmul_flops_per_second": flop_rates[torch.float32],
        "bf16_matmul_flops_per_second": flop_rates[torch.bfloat16], "weight_bytes": weights,
        "bf16_decode_weight_bytes": weight_bytes(bf16),
        "compile_seconds": compile_seconds, "tpot_kv_dtype": dtype_name(engine.kv_dtype),
        "tpot": tpot, "throughput": throughput,
    }


def summarize(result: dict) -> str:
    tpot = markdown_table(
        ["prompt tokens", "cache", "kept per KV head", "TPOT ms"],
        [[r["prompt_tokens"], r["cache"], r["kept"], r["seconds"] * 1e3] for r in result["tpot"]],
    )
    throughput = markdown_table(
        ["batch", "variant", "cached positions", "ms per step", "tokens/s", "bandwidth bound ms", "x bandwidth bound",
         "compute bound ms", "x larger bound"],
        [[r["batch"], r["variant"], r["positions"], r["step_seconds"] * 1e3, r["tokens_per_second"],
          r["bound_seconds"] * 1e3, r["x_bound"], r["compute_bound_seconds"] * 1e3, r["x_roofline"]]
         for r in result["throughput"]],
    )
    # Results from before fp16 caches have no "tpot_kv_dtype": their TPOT rows used fp32 caches.
    lines = [f"TPOT by prompt length: the eager step, cache in {result.get('tpot_kv_dtype', 'float32')}", "", tpot, "",
             throughput, ""]
    snapkv = {r["prompt_tokens"]: r["seconds"] for r in result["tpot"] if r["cache"] == "snapkv"}
    if snapkv:
        longest, shortest = max(snapkv), min(snapkv)
        ratio = snapkv[longest] / snapkv[shortest]
        lines.append(f"- SnapKV TPOT at {longest} tokens / at {shortest}: {ratio:.2f}x (target: at most 1.15x): "
                     f"{'met' if ratio <= 1.15 else 'missed'}")
    by_batch: dict[int, dict[str, dict]] = {}
    for r in result["throughput"]:
        by_batch.setdefault(r["batch"], {})[r["variant"]] = r
    for batch, variants in sorted(by_batch.items()):
        full = variants["transformers generate, full DynamicCache"]
        for name, variant in (("engine", EAGER), ("engine with an fp32 cache", EAGER_FP32), ("compiled engine", COMPILED),
                              ("engine with bf16 decode weights", BF16),
                              ("compiled engine with bf16 decode weights", COMPILED_BF16)):
            if variant not in variants:  # results from before the compiled step existed
                continue
            ours = variants[variant]
            speedup = ours["tokens_per_second"] / full["tokens_per_second"]
            if variant in (BF16, COMPILED_BF16):  # transformers' weights stay fp32, so the target does not apply
                target = " (with weights of another dtype than transformers' fp32)"
            elif batch == 8:
                target = f" (target at batch 8: at least 6x): {'met' if speedup >= 6 else 'missed'}"
            else:
                target = ""
            lines.append(
                f"- batch {batch}: {name} {speedup:.2f}x transformers' full-cache tokens/s{target}"
                + f"; step {ours['x_bound']:.3f}x the bandwidth bound (target: at most 2x): "
                f"{'met' if ours['x_bound'] <= 2 else 'missed'}; {ours['x_roofline']:.1f}x the larger of the "
                "bandwidth and compute bounds"
            )
    if "compile_seconds" in result:
        lines.append(f"- compiling the decode step (its three kinds of step) took {result['compile_seconds']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths and steps")
    parser.add_argument("--budget", type=int, default=512)
    args = parser.parse_args()
    result = run(**{**(QUICK if args.quick else FULL), "budget": args.budget})
    print(summarize(result))
    progress(f"wrote {write_json('decode', result)}")


if __name__ == "__main__":
    main()
