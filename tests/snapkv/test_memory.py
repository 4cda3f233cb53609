"""Scoring memory for an 8K-token prompt with the embedded model's attention shape
(9 query heads, 3 KV heads, head dim 64, window 32, budget 1024, fp32).

The bound, derived: scoring runs one KV head at a time, so its largest temporary is that head's logits,
[3 query heads, 32, 8192] fp32 = 3 MiB, softmaxed in place. The kept keys and values add
2 x [3, 1024, 64] fp32 = 1.5 MiB, the scores and sort buffers under 0.5 MiB, and BLAS packing buffers
about 1 MiB. We allow 8 MiB. Scoring all heads at once would need 9 MiB of logits alone, and a full
8192 x 8192 attention matrix 256 MiB per head, so either regression fails here.

The measurement runs in a child process with glibc's mmap threshold fixed at 64 KiB, so every freed
large block leaves the resident set at once and the peak resident set size reflects live tensors only.
A first call at full size absorbs one-time BLAS workspace allocations.
"""

import os
import subprocess
import sys

from snapkv.memory import ONEDNN_CACHE_VARIABLES

MiB = 2**20

MEASURE = """
import torch
from snapkv.compress import compress_layer
from snapkv.config import CompressionConfig
from snapkv.memory import peak_resident_bytes, reset_peak, resident_bytes

generator = torch.Generator().manual_seed(0)
keys = torch.randn(1, 3, 8192, 64, generator=generator)
values = torch.randn(1, 3, 8192, 64, generator=generator)
queries = torch.randn(1, 9, 32, 64, generator=generator)
config = CompressionConfig(window=32, budget=1024)
compress_layer(queries, keys, values, config, 0.125)

reset_peak()
before = resident_bytes()
kept_keys, _, _ = compress_layer(queries, keys, values, config, 0.125)
print(tuple(kept_keys.shape), peak_resident_bytes() - before)
"""


def test_scoring_memory_at_8k_tokens():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    output = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True)
    shape, extra = output.stdout.rsplit(" ", 1)[0], int(output.stdout.rsplit(" ", 1)[1])
    assert shape == "(1, 3, 1024, 64)"
    assert extra < 8 * MiB, f"scoring took {extra / MiB:.1f} MiB beyond its inputs"


# A thread fills its heap with 16 KiB blocks and frees all but the last one, which keeps glibc from
# trimming the heap on its own. Then it releases the free pages.
RELEASE = """
import ctypes
import threading
from snapkv.memory import release_free_heap, resident_bytes

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
readings = {}

def fill_free_release():
    blocks = [libc.malloc(16384) for _ in range(16384)]
    for block in blocks:
        ctypes.memset(block, 1, 16384)
    for block in blocks[:-1]:
        libc.free(block)
    readings["freed"] = resident_bytes()
    readings["released"] = release_free_heap()
    readings["after"] = resident_bytes()

thread = threading.Thread(target=fill_free_release)
thread.start()
thread.join()
print(readings["freed"], readings["released"], readings["after"])
"""


def test_release_free_heap_returns_freed_pages():
    output = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True).stdout
    freed, released, after = map(int, output.split())
    # 256 MiB were allocated and freed.
    assert released >= 200 * MiB
    assert after <= freed - 200 * MiB


# A packed linear layer multiplies 200 different row counts, each of which makes a oneDNN primitive.
PRIMITIVES = """
import sys
import torch
from torch import nn
from snapkv.memory import limit_onednn_caches, release_free_heap, resident_bytes
from snapkv.packed_linear import PackedLinear

if sys.argv[1] != "default":
    limit_onednn_caches(int(sys.argv[1]))
torch.set_num_threads(1)
layer = PackedLinear(nn.Linear(576, 1536))
with torch.inference_mode():
    layer(torch.ones(7, 576))
    release_free_heap()
    before = resident_bytes()
    for rows in range(100, 300):
        layer(torch.ones(rows, 576))
    release_free_heap()
print(resident_bytes() - before)
"""


def primitive_growth(capacity: str) -> int:
    env = {name: value for name, value in os.environ.items() if name not in ONEDNN_CACHE_VARIABLES}
    command = [sys.executable, "-c", PRIMITIVES, capacity]
    return int(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)


def test_limit_onednn_caches_bounds_primitive_memory():
    # About 120 MiB with the default sizes and 3 MiB with 8 entries, measured on a 2-core Intel Xeon.
    assert primitive_growth("default") > 60 * MiB, "the default caches no longer grow: the limit is not needed"
    assert primitive_growth("8") < 15 * MiB
