"""Logit rules that force forks, for the untuned base model and for tests.

A model tuned for APAR decides where to fork by itself. These rules let the engine's
APAR path run on any model: `ForceForks` forks at fixed token counts (tests), and
`ListItemForks` forks after each bold list-item title and ends the child at the item's
end (the demo on the untuned base model).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .engine.thread import Thread
from .tokens import ControlTokens


def force_token(logits: torch.Tensor, token: int) -> None:
    logits.fill_(float("-inf"))
    logits[token] = 0.0


def fork_allowed(logits: torch.Tensor, control: ControlTokens) -> bool:
    """False when the APAR rules (applied before any custom rule) banned `[Fork]`."""
    return bool(logits[control.fork_id] != float("-inf"))


@dataclass(frozen=True)
class ForceForks:
    """Root forks after each own-token count in `fork_after` and ends after `root_tokens`;
    children end after `child_tokens` own tokens (not counting `[Child]`). None: run free."""

    control: ControlTokens
    fork_after: frozenset[int]
    child_tokens: int | None = None
    root_tokens: int | None = None

    def __call__(self, thread: Thread, logits: torch.Tensor) -> None:
        generated = len(thread.own_tokens)
        if thread.parent is None:
            if self.root_tokens is not None and generated >= self.root_tokens:
                force_token(logits, min(self.control.eos_ids))
            elif generated in self.fork_after and fork_allowed(logits, self.control):
                force_token(logits, self.control.fork_id)
        elif self.child_tokens is not None and generated - 1 >= self.child_tokens:
            force_token(logits, min(self.control.eos_ids))


@dataclass
class ListItemForks:
    """Forks after a numbered item's head (`1. **Title:**` or `1. First sentence.`) in the root; the
    child writes the item's body and ends where the model starts a new paragraph; the
    root then moves on to the next item."""

    control: ControlTokens
    tokenizer: object
    _paragraph_tokens: torch.Tensor = field(init=False)
    _paragraph_set: frozenset[int] = field(init=False)

    MIN_BODY_TOKENS = 4
    MAX_BODY_TOKENS = 64
    # A numbered item's head: a bold title, or its first sentence.
    TITLE = re.compile(r"(?:^|\n)\d+\.\s+(?:\*\*[^*\n]{2,80}\*\*:?|[^*\n]{3,120}?[.:])$")

    def __post_init__(self) -> None:
        vocab = self.tokenizer.get_vocab()
        ids = [i for tok, i in vocab.items() if "\n" in self.tokenizer.convert_tokens_to_string([tok])]
        self._paragraph_tokens = torch.tensor(sorted(ids), dtype=torch.long)
        self._paragraph_set = frozenset(ids)
        self._newline = self.tokenizer.encode("\n\n", add_special_tokens=False)

    def __call__(self, thread: Thread, logits: torch.Tensor) -> None:
        own = thread.own_tokens
        if thread.parent is None:
            if own and own[-1] == self.control.fork_id:
                force_token(logits, self._newline[0])  # the root skips the body: next item
                return
            tail = self.tokenizer.decode(own[-24:], skip_special_tokens=True)
            if self.TITLE.search(tail) and fork_allowed(logits, self.control):
                force_token(logits, self.control.fork_id)
        else:
            # The body ends where the model would break the line; a body has at least a few tokens.
            if len(own) > self.MAX_BODY_TOKENS:
                force_token(logits, min(self.control.eos_ids))
            elif len(own) <= self.MIN_BODY_TOKENS:
                logits[self._paragraph_tokens] = float("-inf")
                logits[list(self.control.eos_ids)] = float("-inf")
            elif int(logits.argmax()) in self._paragraph_set:
                force_token(logits, min(self.control.eos_ids))
