"""The embedded SmolLM2-135M-Instruct on real text: a fact hidden in the middle of about 900 tokens of
the GPL-2 text must survive 2x compression. (This 135M model misses the same fact at other depths even
with the full cache, so the test places it where the full cache finds it.)"""

import re

import pytest

from snapkv.config import CompressionConfig, SamplingParams
from snapkv.engine import Request
from snapkv.text import prompt_ids

pytestmark = pytest.mark.real_model

NEEDLE = " The secret password for the archive is MANGO-42. "
QUESTION = "What is the secret password for the archive?"
ANSWER = re.compile(r"\bMANGO-42\b")


@pytest.fixture(scope="module")
def needle_prompt(real_engine):
    from importlib.resources import files

    words = files("snapkv").joinpath("data/gpl-2.0.txt").read_text().split(" ")
    filler = " ".join(words[300:1000])
    middle = filler.rfind(" ", 0, len(filler) // 2)
    text = filler[:middle] + NEEDLE + filler[middle:]
    return tuple(prompt_ids(real_engine.tokenizer, f"{text}\n\n{QUESTION}"))


def answer(engine, ids, compression):
    request = Request("needle", ids, SamplingParams(max_tokens=24), compression)
    return "".join(event.text for event in engine.generate([request]))


def test_needle_found_with_full_cache(real_engine, needle_prompt):
    assert 500 <= len(needle_prompt) <= 1500
    assert ANSWER.search(answer(real_engine, needle_prompt, None))


def test_needle_found_at_2x_compression(real_engine, needle_prompt):
    budget = len(needle_prompt) // 2
    [result] = real_engine.prefill([Request("needle", needle_prompt, SamplingParams(), CompressionConfig(budget=budget))])
    assert result.cache.kept_length == budget
    assert result.cache.keys.shape == (30, 3, budget, 64)
    assert ANSWER.search(answer(real_engine, needle_prompt, CompressionConfig(budget=budget)))
