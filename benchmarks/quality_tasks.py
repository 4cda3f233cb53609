"""Inputs of the quality benchmark: needle prompts hidden in real text, and real documents to continue.

Needle: the line "The access code for vault <Name> is <WORD-NN>." goes at a given depth into a
stretch of the GPL-2 text shipped with this package, the question "What is the access code for
vault <Name>?" follows after a blank line, and the whole is one user turn of the chat template. Names
and values come from fixed word lists through a seeded generator, so every run asks the same
questions. The answer counts when it contains the value exactly. Even with the full cache the
embedded 135M model misses some of these (it found 19 of 24 in a trial at 500 to 2,000 tokens), so
the full cache's accuracy is the reference the compressed caches are compared with.

Documents: the GPL-2 text, and the Python language reference that ships inside CPython's standard
library (`pydoc_data.topics`, the text behind `help()`). Both are real prose that nobody wrote for
this benchmark; the reference is technical English unlike the licence.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from importlib.resources import files

from transformers import PreTrainedTokenizerBase

from snapkv.text import prompt_ids

VAULT_NAMES = (
    "Osprey", "Juniper", "Marlin", "Tundra", "Saffron", "Granite", "Heron", "Quartz", "Willow", "Falcon",
    "Cobalt", "Larch", "Puffin", "Basalt", "Thistle", "Walrus",
)
CODE_WORDS = (
    "KESTREL", "LANTERN", "CITADEL", "MAGNOLIA", "HARBOR", "VELVET", "PRISM", "TIMBER", "COMET", "BRAMBLE",
    "NECTAR", "ORCHID", "SUMMIT", "GLACIER", "EMBER", "MEADOW",
)
QUESTION = "What is the access code for vault {name}?"
NEEDLE = "The access code for vault {name} is {value}."

# Python reference topics with long stretches of prose, in the order they are concatenated: the
# execution model, the import system and the compound statements (about 15,000 tokens in Python 3.11).
REFERENCE_TOPICS = ("execmodel", "import", "compound")


@dataclass(frozen=True)
class NeedleCase:
    """One needle prompt: the document with the fact inside, the question, and the expected value."""

    case_id: str
    target_tokens: int
    depth: float
    name: str
    value: str
    document: str
    question: str
    prompt_ids: tuple[int, ...]

    def is_hit(self, answer: str) -> bool:
        """Return whether an answer contains the value exactly (not as part of a longer code)."""
        return re.search(rf"(?<![A-Za-z0-9]){re.escape(self.value)}(?![0-9])", answer) is not None


@dataclass(frozen=True)
class DocumentCase:
    """A prefix of a real document and the tokens that follow it, scored teacher-forced."""

    case_id: str
    prefix_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]


def gpl_text() -> str:
    return files("snapkv").joinpath("data/gpl-2.0.txt").read_text()


def reference_text() -> str:
    """Return the concatenated Python reference topics (shipped with CPython as `pydoc_data.topics`).

    The text is the running Python's own, so it changes a little between Python versions.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in REFERENCE_TOPICS)


def filler(tokenizer: PreTrainedTokenizerBase, text: str, start_line: int, num_tokens: int) -> str:
    """Return about `num_tokens` tokens of `text` starting at line `start_line`, wrapping around, cut at a line end."""
    lines = text.splitlines(keepends=True)
    start_line %= len(lines)
    rotated = "".join(lines[start_line:] + lines[:start_line])
    ids = tokenizer(rotated * 2, add_special_tokens=False).input_ids[:num_tokens]
    cut = tokenizer.decode(ids)
    return cut[: cut.rfind("\n") + 1] or cut


def insert_line(document: str, line: str, depth: float) -> str:
    """Insert `line` as a line of its own, at the start of the last line that begins before `depth` (0 to 1)."""
    target = int(len(document) * depth)
    at = document.rfind("\n", 0, target) + 1
    return document[:at] + line + "\n" + document[at:]


def needle_case(
    tokenizer: PreTrainedTokenizerBase, target_tokens: int, depth: float, index: int, seed: int = 0
) -> NeedleCase:
    """Build needle prompt `index`: about `target_tokens` prompt tokens with the fact at `depth`."""
    rng = random.Random(f"{seed}:{target_tokens}:{depth}:{index}")
    name = rng.choice(VAULT_NAMES)
    value = f"{rng.choice(CODE_WORDS)}-{rng.randint(10, 99)}"
    question = QUESTION.format(name=name)
    needle = NEEDLE.format(name=name, value=value)

    # The template, the needle and the question take the rest of the target length.
    overhead = len(prompt_ids(tokenizer, f"{needle}\n\n\n{question}"))
    text = gpl_text()
    haystack = filler(tokenizer, text, rng.randrange(len(text.splitlines())), target_tokens - overhead)
    document = insert_line(haystack, needle, depth)
    ids = prompt_ids(tokenizer, f"{document}\n\n{question}")
    case_id = f"needle-{target_tokens}-d{depth:g}-{index}"
    return NeedleCase(case_id, target_tokens, depth, name, value, document, question, tuple(ids))


def needle_cases(
    tokenizer: PreTrainedTokenizerBase, lengths: list[int], depths: list[float], per_cell: int
) -> list[NeedleCase]:
    """Build `per_cell` needle prompts for every length and depth."""
    return [
        needle_case(tokenizer, length, depth, index)
        for length in lengths
        for depth in depths
        for index in range(per_cell)
    ]


def document_cases(
    tokenizer: PreTrainedTokenizerBase, prefix_tokens: list[int], continuation_tokens: int, offsets: int
) -> list[DocumentCase]:
    """Cut `offsets` evenly spaced (prefix, continuation) pairs of each length from each document."""
    cases = []
    for name, text in (("gpl-2.0", gpl_text()), ("python-reference", reference_text())):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for length in prefix_tokens:
            span = length + continuation_tokens
            if span > len(ids):
                raise ValueError(f"{name} has {len(ids)} tokens, fewer than {span} needed for a prefix of {length}")
            for number in range(offsets):
                start = (len(ids) - span) * number // max(1, offsets - 1) if offsets > 1 else 0
                prefix = tuple(ids[start : start + length])
                continuation = tuple(ids[start + length : start + span])
                cases.append(DocumentCase(f"{name}-{length}-at{start}", prefix, continuation))
    return cases
