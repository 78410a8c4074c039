"""One sequence being decoded: how its next token is chosen, and how its text is released as it grows (held
back while it may still turn into a stop string or ends inside a multi-byte character)."""

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row of logits: the argmax when greedy, else a draw at the temperature from the
    smallest set of tokens whose probability reaches top_p."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # the first token always stays
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Sequence:
    """One choice of one request: its tokens so far, its text released so far, and why it ended."""

    def __init__(
        self, prompt: list[int], sampling: Sampling, decode: Callable[[list[int]], str], eos: set[int], seed: int | None
    ):
        self.prompt, self.sampling, self.decode, self.eos = prompt, sampling, decode, eos
        self.tokens: list[int] = []
        self.released = ""
        self.finish_reason: str | None = None
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take the next token; return the text it releases (possibly none)."""
        self.tokens.append(token)
        if token in self.eos:
            self.finish_reason = "stop"
            return self._release(self.decode(self.tokens[:-1]), final=True)
        text = self.decode(self.tokens)
        for stop in self.sampling.stop:
            at = text.find(stop, max(len(self.released) - len(stop), 0))
            if at >= 0:
                self.finish_reason = "stop"
                return self._release(text[:at], final=True)
        if len(self.tokens) >= self.sampling.max_tokens:
            self.finish_reason = "length"
            return self._release(text, final=True)
        return self._release(text, final=False)

    def _release(self, text: str, final: bool) -> str:
        if not final:
            if text.endswith("\ufffd"):  # a character cut between tokens: wait for its other bytes
                return ""
            hold = max((len(s) - 1 for s in self.sampling.stop), default=0)
            text = text[: len(text) - hold] if hold else text
        if len(text) <= len(self.released) or not text.startswith(self.released):
            return ""
        new, self.released = text[len(self.released) :], text
        return new
