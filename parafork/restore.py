"""Restoring a tree of threads to one linear token sequence in reading order.

Reading order is depth first: a thread's own tokens, where each `[Fork]` is replaced by
the restored child born at it, so a list item's head is followed by its body and then by
the next head; a `[Join]` leaves no text (what follows it comes after every body before it). Everything works on token ids (no string offsets), so restored text is
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


def _walk(node: TreeNode, control: ControlTokens, final_only: bool, tokens: list[int], origins: list | None) -> bool:
    """Appends the restored tokens (and their (thread, own index) origins) in reading order;
    returns whether the subtree is complete."""
    complete = node.finished
    for i, token in enumerate(node.own_tokens):
        if token == control.fork_id and (child := node.children.get(i)) is not None:
            child_complete = _walk(child, control, final_only, tokens, origins)
            complete = complete and child_complete
            if final_only and not child_complete:
                return False
        elif token not in (control.child_id, control.join_id) and token not in control.eos_ids:
            tokens.append(token)  # a [Fork] with no child is a raw-mode marker and stays
            if origins is not None:
                origins.append((node, i))
    return complete


def linearize(node: TreeNode, control: ControlTokens, final_only: bool = False) -> tuple[list[int], bool]:
    """Restored tokens of the tree in reading order, and whether the tree is complete.

    With `final_only`, stops at the first point where an unfinished thread may still add
    tokens (the end of that thread's tokens so far): everything before it is final and
    can be streamed.
    """
    tokens: list[int] = []
    return tokens, _walk(node, control, final_only, tokens, None)


def restore_origins(
    node: TreeNode, control: ControlTokens, final_only: bool = False
) -> tuple[list[int], list[tuple[TreeNode, int]], bool]:
    """`linearize` plus the (thread, own index) of every restored token, so that values a
    thread keeps beside its own tokens (log-probabilities) restore in the same order."""
    tokens: list[int] = []
    origins: list[tuple[TreeNode, int]] = []
    return tokens, origins, _walk(node, control, final_only, tokens, origins)
