"""Per-sequence generation state shared by the in-process engine and the decode service."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from snapkv.config import SamplingParams
from snapkv.sampling import sample_token
from snapkv.text import TextStream


@dataclass
class SequenceState:
    """Tokens generated so far for one request, its text stream and, once finished, why it ended."""

    sampling: SamplingParams
    stream: TextStream
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"

    @classmethod
    def start(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingParams,
        stop_ids: frozenset[int],
        prompt_ids: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> "SequenceState":
        return cls(sampling, TextStream(tokenizer, sampling.stop, prompt_ids), stop_ids, generator)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def sample(self, logits: torch.Tensor) -> int:
        return sample_token(logits, self.sampling, self.generator)

    def accept(self, token: int) -> str:
        """Record the next token; return the text it makes final, and set `finish_reason` on the last one."""
        self.generated.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.stream.finish()

        text = self.stream.push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.sampling.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            text += self.stream.finish()
        return text
