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
