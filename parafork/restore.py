"""Restoring a tree of threads to one linear token sequence in reading order.

Reading order is depth first: a thread's own tokens, where each `[Fork]` is replaced by
the restored child born at it, so a list item's head is followed by its body and then by
the next head. Everything works on token ids (no string offsets), so restored text is
exactly the text a linear decoding of the same tokens would give.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from .tokens import ControlTokens


class TreeNode(Protocol):
    """What restoration needs of a thread; engine threads and training trees both fit."""

    @property
    def own_tokens(self) -> Sequence[int]: ...

    @property
    def children(self) -> Mapping[int, TreeNode]: ...  # own index of a [Fork] -> child

    @property
    def finished(self) -> bool: ...


def linearize(node: TreeNode, control: ControlTokens, final_only: bool = False) -> tuple[list[int], bool]:
    """Restored tokens of the tree in reading order, and whether the tree is complete.

    With `final_only`, stops at the first point where an unfinished thread may still add
    tokens (the end of that thread's tokens so far): everything before it is final and
    can be streamed.
    """
    out: list[int] = []
    complete = node.finished
    for i, token in enumerate(node.own_tokens):
        if token == control.fork_id:
            child = node.children.get(i)
            if child is None:
                out.append(token)  # a marker no thread was started for (raw mode)
                continue
            tokens, child_complete = linearize(child, control, final_only)
            out.extend(tokens)
            complete = complete and child_complete
            if final_only and not child_complete:
                return out, False
        elif token != control.child_id and token not in control.eos_ids:
            out.append(token)
    return out, complete
