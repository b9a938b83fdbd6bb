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

from .engine.budget import may_fork
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
    """Root forks after each own-token count in `fork_after`, joins after each count in
    `join_after` (needs `SamplingParams(join=True)`), and ends after `root_tokens`; children
    end after `child_tokens` own tokens (not counting `[Child]`). None: run free."""

    control: ControlTokens
    fork_after: frozenset[int]
    child_tokens: int | None = None
    root_tokens: int | None = None
    join_after: frozenset[int] = frozenset()

    def __call__(self, thread: Thread, logits: torch.Tensor) -> None:
        generated = len(thread.own_tokens)
        if thread.parent is None:
            if self.root_tokens is not None and generated >= self.root_tokens:
                force_token(logits, min(self.control.eos_ids))
            elif generated in self.join_after:
                force_token(logits, self.control.join_id)
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


# A list item's line: numbering or a bullet, optional bold, then the head (up to ':' or '.').
ITEM_LINE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s+(?:\*\*)?(.*)$")


def normalize_head(head: str) -> str:
    """Lower case, markdown and punctuation dropped, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", head.lower()).split())


def item_head(line: str) -> str | None:
    """The head of a list item's line (up to ':', '.' or a closing '**'); None if not an item."""
    m = ITEM_LINE.match(line)
    return re.split(r"[:.]|\*\*", m.group(1), maxsplit=1)[0].rstrip() if m else None


def list_heads(text: str) -> list[str]:
    """The normalized heads of the list items in `text`, in order."""
    heads = [normalize_head(h) for h in map(item_head, text.split("\n")) if h is not None]
    return [h for h in heads if h]


@dataclass
class NoRepeatedHeads:
    """Keeps list items' heads from repeating (measured on the bundled model: see the README).

    - While a thread writes a list item's line, and the head so far (after its numbering) is a
      non-empty prefix of an earlier item's head in what the thread sees (its ancestors' text up
      to its fork, then its own), the token that would continue into that earlier head is
      banned, and once the head so far equals an earlier one, so are the tokens that would end
      it (':', '.', '**'): a head may share its first words with another ("Seek support" after
      "Seek help") but not repeat it.
    - A child whose body reaches a line break and would start a numbered or bulleted line
      ends there instead: the next item is its parent's to write (the bundled model's children
      sometimes wrote the next head, or their own head again). A child that starts with a line
      break, before any body, may not open such a line at all (v2 at step 140 wrote
      "1. Customer reviews:" + a child "\n2. Customer retention:", then the root the same head).
    - A parent at the start of a line that may no longer fork (the budget has no room for
      another body, `engine/budget.py`) does not open a new item: it concludes or ends
      (the bundled model otherwise ended answers on a bare head such as "14. Stay focused:");
      the check leaves room for the head itself (`HEAD_TOKENS`), since children keep using the
      budget while it is written. (Banning the end token after a bare head instead made the
      model skip the body and write a conclusion that the budget then cut.)

    Added by `LLM` to forking requests with `SamplingParams.no_repeat_heads`.
    """

    control: ControlTokens
    tokenizer: object
    HEAD_TOKENS = 12  # a list item's numbering and head, in tokens
    TAIL_TOKENS = 32  # a head still being written lies within the answer's last this many tokens
    _starting: dict = field(default_factory=dict, init=False)
    _texts: list[str] | None = field(default=None, init=False)
    _newline_ids: frozenset[int] | None = field(default=None, init=False)

    def _token_texts(self) -> list[str]:
        """Each token id's own text, leading spaces kept (one scan of the vocabulary, on first use:
        ~0.18 s for 49k tokens, paid once per guard, not once per pattern)."""
        if self._texts is None:
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._texts = [self.tokenizer.convert_tokens_to_string([p]) if p else "" for p in pieces]
            self._newline_ids = frozenset(i for i, t in enumerate(self._texts) if "\n" in t)
        return self._texts

    def _tokens_starting(self, pattern: str) -> list[int]:
        """Token ids whose text (leading spaces dropped) starts with `pattern` (computed once each)."""
        if pattern not in self._starting:
            self._starting[pattern] = [i for i, t in enumerate(self._token_texts()) if re.match(pattern, t.lstrip())]
        return self._starting[pattern]

    def item_starts(self) -> list[int]:
        """Token ids whose text starts a numbered or bulleted line."""
        return self._tokens_starting(r"\d|[-*•]")

    def __call__(self, thread: Thread, logits: torch.Tensor) -> None:
        # Only the answer's last line matters unless a head is being written: decode a short tail
        # first (every forking thread passes here at every step) and the whole text only then.
        answer = thread.token_ids[len(thread.request.prompt_token_ids) :]
        self._token_texts()
        if self._newline_ids.isdisjoint(answer[-self.TAIL_TOKENS :]):
            return  # deep in a long line: no item is being opened or named (no decode: a set test)
        tail = self.tokenizer.decode(answer[-self.TAIL_TOKENS :], skip_special_tokens=True)
        if "\n" not in tail:
            return
        line = tail.rsplit("\n", 1)[1]
        if not line.strip(" \t"):  # at a line's start (indentation included)
            if thread.children and not may_fork(thread, extra=self.HEAD_TOKENS):
                logits[self.item_starts()] = float("-inf")
            elif thread.parent is not None and not self._body_begun(thread):
                logits[self.item_starts()] = float("-inf")  # a body, not the next item's head
            elif thread.parent is not None and self._own_line_start(thread) and int(logits.argmax()) in self.item_starts():
                force_token(logits, min(self.control.eos_ids))
            return
        m = ITEM_LINE.match(line)
        if not m or not m.group(1).strip() or ":" in m.group(1):
            return
        current = m.group(1)
        banned = set()
        for earlier in self.tokenizer.decode(answer, skip_special_tokens=True).split("\n")[:-1]:
            head = item_head(earlier) or ""
            if len(head) > len(current) and head.lower().startswith(current.lower()):
                continuation = self.tokenizer.encode(head[len(current) :], add_special_tokens=False)
                if continuation:
                    banned.add(continuation[0])
            elif head and head.lower() == current.rstrip().lower():
                banned.update(self._tokens_starting(r"[:.]|\*\*"))
        if banned:
            logits[sorted(banned)] = float("-inf")

    def _body_begun(self, thread: Thread) -> bool:
        """The child has written more than white space after its `[Child]`."""
        return bool(self.tokenizer.decode(thread.own_tokens[:8], skip_special_tokens=True).strip())

    def _own_line_start(self, thread: Thread) -> bool:
        """The line break that starts the current line is the child's own (its body has begun)."""
        own = self.tokenizer.decode(thread.own_tokens[-8:], skip_special_tokens=True)
        return len(thread.own_tokens) > 2 and own.rstrip(" \t").endswith("\n")
