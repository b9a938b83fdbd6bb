"""Training samples: one packed sequence per tree, with a tree attention mask.

The root thread (prompt + root text, `[Fork]` where each child was, end token) comes
first, then every child thread (`[Child]` + its text + end token) in depth-first order.
A token sees its own thread up to itself and each ancestor up to the `[Fork]` its branch
was born at; never a sibling. Positions continue from the fork (a child's `[Child]` sits
at the fork's position + 1), exactly as the engine decodes. Labels are the next token of
the same thread, on the answer only (the prompt and the forced `[Child]` are not predicted).

Joins (a `JOIN` mark in a tree, engine/thread.py): the thread writes `[Join]`, and from that
token on, it and every thread it forks later also see each child it forked since its
previous join (the child's tokens but its end token, and recursively what that child
joined), exactly as the engine attends; `[Join]` sits at max(previous position + 1, last
position of what it joins + 1). A tree with no join packs as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tokens import ControlTokens
from .extract import JOIN, Node

IGNORE = -100


@dataclass
class TreeJoin:
    """A `[Join]` at `tokens[index]` of a training thread, over the threads `children`."""

    index: int
    position: int
    children: list[int]


@dataclass
class ThreadTokens:
    """One APAR thread of a training tree in its linear training form (not an engine `Thread`)."""

    tokens: list[int]
    start_pos: int  # position of tokens[0]
    parent: int | None  # index of the parent thread
    fork_pos: int | None  # position of the parent's [Fork] this thread was born at
    first_label: int  # index in tokens of the first token that is predicted
    joins: list[TreeJoin] = field(default_factory=list)

    def position(self, k: int) -> int:
        """Position of tokens[k]: consecutive from `start_pos`, from each join's on."""
        pos = self.start_pos + k
        for join in self.joins:
            if join.index <= k:
                pos = join.position + k - join.index
        return pos


def joined_tokens(threads: list[ThreadTokens], join: TreeJoin) -> list[tuple[int, int]]:
    """(thread, token index) of everything a join makes visible: each child's tokens but its
    end token, and recursively what the child joined."""
    out = []
    for c in join.children:
        out += [(c, k) for k in range(len(threads[c].tokens) - 1)]
        for j in threads[c].joins:
            out += joined_tokens(threads, j)
    return out


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
    unjoined: list[int] = []
    for segment in node.segments:
        if isinstance(segment, str):
            threads[me].tokens.extend(tokenizer.encode(segment, add_special_tokens=False))
            continue
        thread = threads[me]
        if segment is JOIN:
            if markers:
                thread.tokens.append(control.join_id)
                last = max((threads[t].position(k) for t, k in joined_tokens(threads, TreeJoin(0, 0, unjoined))), default=-1)
                previous = thread.position(len(thread.tokens) - 2)
                thread.joins.append(TreeJoin(len(thread.tokens) - 1, max(previous + 1, last + 1), unjoined))
                unjoined = []
            continue
        if markers:
            thread.tokens.append(control.fork_id)
        fork_pos = thread.position(len(thread.tokens) - 1) if thread.tokens else start - 1
        child = ThreadTokens([control.child_id] if markers else [], fork_pos + 1, me, fork_pos, first_label=0)
        threads.append(child)
        unjoined.append(len(threads) - 1)
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
    ids, pos, owner, own_index, labels = [], [], [], [], []
    for t, thread in enumerate(threads):
        n = len(thread.tokens)
        ids += thread.tokens
        pos += [thread.position(k) for k in range(n)] if thread.joins else range(thread.start_pos, thread.start_pos + n)
        owner += [t] * n
        own_index += range(n)
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
    if any(thread.joins for thread in threads):
        allowed |= _joined(threads, owner_t, torch.tensor(own_index))
    return PackedSample(torch.tensor(ids), pos_t, torch.tensor(labels), allowed, threads)


def _joined(threads: list[ThreadTokens], owner: torch.Tensor, own_index: torch.Tensor) -> torch.Tensor:
    """[L, L]: query i sees key j through a join (of its thread from the join's token on, or
    of an ancestor before the query's branch was forked)."""
    num = len(threads)
    never = 1 << 40
    since = torch.full((num, num), never, dtype=torch.long)  # since[a, b]: own index of a from which b's tokens are joined
    for t, thread in enumerate(threads):
        for join in thread.joins:
            seen = {b for b, _ in joined_tokens(threads, join)}
            for a in range(num):  # t itself, and its descendants born after the join
                d, up = a, threads[a].parent
                if a == t:
                    start = join.index
                else:
                    while up is not None and up != t:
                        d, up = up, threads[up].parent
                    if up is None or threads[d].fork_pos < join.position:
                        continue
                    start = 0
                for b in seen:
                    since[a, b] = min(since[a, b], start)
    not_end = torch.tensor([k < len(threads[t].tokens) - 1 for t, k in zip(owner.tolist(), own_index.tolist())])
    return (own_index[:, None] >= since[owner[:, None], owner[None, :]]) & not_end[None, :]


def full_context(threads: list[ThreadTokens], t: int) -> list[int]:
    """ThreadTokens t as one causal sequence: its ancestors' tokens up to its fork, then its own.
    Token i of it sits at position i, so the reference's 1 + k separate samples are these."""
    thread = threads[t]
    if thread.parent is None:
        return list(thread.tokens)
    return full_context(threads, thread.parent)[: thread.fork_pos + 1] + thread.tokens
