"""Prompt building and output text: chat templates, stop tokens, incremental detokenisation, stop strings."""

from __future__ import annotations

from typing import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

# End-of-turn markers of common chat templates; each one that the vocabulary has stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# Prompt tokens decoded in front of the output so that the first token's leading space survives.
PROMPT_CONTEXT_TOKENS = 5


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | None = None,
    messages: Sequence[dict[str, str]] | None = None,
    raw: bool = False,
) -> list[int]:
    """Tokenize a prompt: chat messages, or one text sent as a user turn unless `raw` or no chat template."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if messages is not None and tokenizer.chat_template is None:
        raise ValueError("this model has no chat template, so it takes a plain prompt, not messages")

    if messages is None and (raw or tokenizer.chat_template is None):
        return tokenizer(prompt, add_special_tokens=True).input_ids

    if messages is None:
        messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, eos_token_ids: Iterable[int | None]) -> frozenset[int]:
    """Collect every token id that ends generation: the model's EOS ids and the chat end-of-turn markers."""
    ids = {i for i in eos_token_ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)


class TextStream:
    """Turn generated token ids into text deltas, cutting the output at the first stop string.

    Decoding uses a few tokens of context before the new ones, so that multi-byte UTF-8 characters split
    across tokens are emitted only when complete, and a leading space is never lost. Text that could be
    the start of a stop string is held back until it either completes the stop string or cannot.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (), context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids = list(context_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # output text decoded so far
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Return whatever text is still held back; call once when generation ends."""
        if not self.stopped and self.read_offset < len(self.ids):
            before = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(before) :]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for stop in self.stop:
            # A match can only start where the previous search could not have seen it whole.
            index = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if index != -1:
                self.text = self.text[:index]
                self.stopped = True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if stop.startswith(self.text[-size:]):
                    longest = size
                    break
        return longest
