"""Branch independence, judged by the model itself (the ASPD idea).

For every branch of a tree, compare the mean NLL of its body tokens in two contexts:
only its ancestors up to the fork (what an APAR thread sees), and the full serial answer
before it (siblings included). A branch whose NLL rises by more than `threshold` nats per
token without its siblings needs them: it is merged back into its parent's text. A tree
left with fewer than two branches is no longer a tree.

The judge reads plain text (no control tokens, which an untuned model does not know):
"alone" is the ancestors' text up to the branch's head, then the branch. One packed
forward (tree mask) scores all branches alone; one causal forward scores them serially.
A branch's first token is left out of both means (packing puts it after another thread).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tokens import ControlTokens
from .extract import Node
from .samples import pack, tree_threads

DEFAULT_THRESHOLD = 0.3  # nats per token


@dataclass
class BranchScore:
    alone: float  # mean NLL given ancestors only
    serial: float  # mean NLL given the whole answer before it

    @property
    def dependence(self) -> float:
        return self.alone - self.serial


def _serial_ranges(node: Node, tokenizer, out: list[int], ranges: list[tuple[int, int]]) -> None:
    """Tokens of the answer in reading order (same pieces as the packed form), and for
    every child in depth-first order the range of its own tokens among them."""
    for segment in node.segments:
        if isinstance(segment, str):
            out.extend(tokenizer.encode(segment, add_special_tokens=False))
        else:
            slot = len(ranges)
            ranges.append((len(out), -1))
            _serial_ranges(segment, tokenizer, out, ranges)
            ranges[slot] = (ranges[slot][0], len(out))


def _flat(node: Node, tokenizer) -> list[int]:
    out: list[int] = []
    _serial_ranges(node, tokenizer, out, [])
    return out


def _children(node: Node) -> list[Node]:
    """All children depth first (the order of threads after the root)."""
    out: list[Node] = []
    for c in node.children:
        out.append(c)
        out += _children(c)
    return out


@torch.no_grad()
def score_tree(model, tokenizer, control: ControlTokens, prompt_ids: list[int], root: Node) -> list[BranchScore]:
    """One score per branch, in depth-first order."""
    threads = tree_threads(prompt_ids, root, tokenizer, control, markers=False)
    sample = pack(threads)
    logits = model(
        input_ids=sample.input_ids[None], position_ids=sample.position_ids[None],
        attention_mask=sample.attention_bias(torch.float32),
    ).logits[0]
    packed_nll = F.cross_entropy(logits[:-1], sample.input_ids[1:], reduction="none")

    serial: list[int] = []
    ranges: list[tuple[int, int]] = []
    _serial_ranges(root, tokenizer, serial, ranges)
    serial_ids = torch.tensor(prompt_ids + serial)
    serial_nll = F.cross_entropy(model(serial_ids[None]).logits[0][:-1], serial_ids[1:], reduction="none")

    starts = [0]
    for t in threads:
        starts.append(starts[-1] + len(t.tokens))
    scores = []
    for k, (node, (lo, _)) in enumerate(zip(_children(root), ranges)):
        thread_start = starts[k + 1]  # thread k + 1 is the k-th child
        alone, ser = [], []
        thread_idx, read_idx = 0, lo + len(prompt_ids)
        for segment in node.segments:
            if isinstance(segment, str):
                n = len(tokenizer.encode(segment, add_special_tokens=False))
                # Each token's NLL sits at its predecessor: packed within its thread, serial in the answer.
                alone += [packed_nll[thread_start + thread_idx + j - 1] for j in range(n)]
                ser += [serial_nll[read_idx + j - 1] for j in range(n)]
                thread_idx, read_idx = thread_idx + n, read_idx + n
            else:  # a grandchild: its own thread; its whole text in the answer
                read_idx += len(_flat(segment, tokenizer))
        alone, ser = alone[1:], ser[1:]  # the first token's packed predecessor is another thread
        if not alone:
            scores.append(BranchScore(0.0, 0.0))
            continue
        scores.append(BranchScore(float(torch.stack(alone).mean()), float(torch.stack(ser).mean())))
    return scores


def merge_dependent(root: Node, scores: list[BranchScore], threshold: float = DEFAULT_THRESHOLD) -> Node:
    """The tree with every dependent branch turned back into serial text."""
    it = iter(scores)

    def walk(node: Node) -> Node:
        segments: list = []
        for s in node.segments:
            if isinstance(s, str):
                if segments and isinstance(segments[-1], str):
                    segments[-1] += s
                else:
                    segments.append(s)
                continue
            score = next(it)
            child = walk(s)
            if score.dependence > threshold:
                text = child.text()
                if segments and isinstance(segments[-1], str):
                    segments[-1] += text
                else:
                    segments.append(text)
            else:
                segments.append(child)
        return Node(segments)

    return walk(root)
