"""Training samples: one packed sequence per tree, with a tree attention mask.

The root thread (prompt + root text, `[Fork]` where each child was, end token) comes
first, then every child thread (`[Child]` + its text + end token) in depth-first order.
A token sees its own thread up to itself and each ancestor up to the `[Fork]` its branch
was born at; never a sibling. Positions continue from the fork (a child's `[Child]` sits
at the fork's position + 1), exactly as the engine decodes. Labels are the next token of
the same thread, on the answer only (the prompt and the forced `[Child]` are not predicted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import ControlTokens
from .extract import Node

IGNORE = -100


@dataclass
class ThreadTokens:
    """One APAR thread of a training tree in its linear training form (not an engine `Thread`)."""

    tokens: list[int]
    start_pos: int  # position of tokens[0]
    parent: int | None  # index of the parent thread
    fork_pos: int | None  # position of the parent's [Fork] this thread was born at
    first_label: int  # index in tokens of the first token that is predicted


@dataclass
class PackedSample:
    input_ids: torch.Tensor  # [L]
    position_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L], IGNORE where no loss
    allowed: torch.Tensor  # [L, L] bool: query i may attend to key j
    threads: list[ThreadTokens]

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The 4-D additive mask HF models take: [1, 1, L, L] of 0 / -inf."""
        bias = torch.zeros(self.allowed.shape, dtype=dtype).masked_fill_(~self.allowed, torch.finfo(dtype).min)
        return bias[None, None]


def _thread_tokens(
    node: Node, tokenizer, control: ControlTokens, threads: list[ThreadTokens], me: int, start: int, markers: bool
) -> None:
    """Appends node's tokens to threads[me]; children become threads of their own. Without
    `markers` there are no [Fork]/[Child]/end tokens: a child simply continues the head."""
    for segment in node.segments:
        if isinstance(segment, str):
            threads[me].tokens.extend(tokenizer.encode(segment, add_special_tokens=False))
            continue
        if markers:
            threads[me].tokens.append(control.fork_id)
        fork_pos = start + len(threads[me].tokens) - 1
        child = ThreadTokens([control.child_id] if markers else [], fork_pos + 1, me, fork_pos, first_label=0)
        threads.append(child)
        _thread_tokens(segment, tokenizer, control, threads, len(threads) - 1, fork_pos + 1, markers)
        if markers:
            child.tokens.append(min(control.eos_ids))


def tree_threads(
    prompt_ids: list[int], root: Node, tokenizer, control: ControlTokens, markers: bool = True
) -> list[ThreadTokens]:
    """The threads of a tree in the APAR linear form, root first, then depth first."""
    threads = [ThreadTokens(list(prompt_ids), 0, None, None, first_label=len(prompt_ids) - 1)]
    _thread_tokens(root, tokenizer, control, threads, 0, 0, markers)
    if markers:
        threads[0].tokens.append(min(control.eos_ids))
    return threads


def pack(threads: list[ThreadTokens]) -> PackedSample:
    ids, pos, owner, labels = [], [], [], []
    for t, thread in enumerate(threads):
        n = len(thread.tokens)
        ids += thread.tokens
        pos += range(thread.start_pos, thread.start_pos + n)
        owner += [t] * n
        labels += [thread.tokens[k + 1] if thread.first_label <= k < n - 1 else IGNORE for k in range(n)]
    # limit[a, b]: the last position of thread b that thread a may see (-1: none).
    num = len(threads)
    limit = torch.full((num, num), -1, dtype=torch.long)
    for t, thread in enumerate(threads):
        limit[t, t] = 1 << 40  # own thread: bounded by the query's position below
        child, parent = thread, thread.parent
        while parent is not None:
            limit[t, parent] = child.fork_pos
            child, parent = threads[parent], threads[parent].parent
    pos_t, owner_t = torch.tensor(pos), torch.tensor(owner)
    key_limit = limit[owner_t[:, None], owner_t[None, :]]  # [L, L]
    allowed = (pos_t[None, :] <= key_limit) & (pos_t[None, :] <= pos_t[:, None])
    return PackedSample(torch.tensor(ids), pos_t, torch.tensor(labels), allowed, threads)


def full_context(threads: list[ThreadTokens], t: int) -> list[int]:
    """ThreadTokens t as one causal sequence: its ancestors' tokens up to its fork, then its own.
    Token i of it sits at position i, so the reference's 1 + k separate samples are these."""
    thread = threads[t]
    if thread.parent is None:
        return list(thread.tokens)
    return full_context(threads, thread.parent)[: thread.fork_pos + 1] + thread.tokens
