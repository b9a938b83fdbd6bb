"""Branch independence, judged by the model itself (the ASPD idea).

For every branch of a tree, compare the mean NLL of its body tokens in two contexts:
only its ancestors up to the fork (what an APAR thread sees), and the full serial answer
before it (siblings included). A branch whose NLL rises by more than `threshold` nats per
token without its siblings needs them: it is merged back into its parent's text. A tree
left with fewer than two branches is no longer a tree.

The judge reads plain text (no control tokens, which an untuned model does not know):
"alone" is the ancestors' text up to the branch's head, then the branch. One packed
forward per tree scores both contexts: the tree's threads (tree mask) and, as one more
thread forked where the first branch begins, the rest of the answer in reading order, so
the prompt and the text before the first branch are read once. Logits are computed only
where a token is scored. A branch's first token is left out of both means (in the packed
form it follows another thread's last token).

Measured on a 2-core AMD EPYC (AVX2, fp32), base model, ShareGPT trees: one tree per
forward as two separate full forwards took 3.0 s per tree; the single packed forward with
logits only where scored is the speed `check_folder` prints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tokens import ControlTokens
from .extract import Node
from .samples import ThreadTokens, pack, tree_threads

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
        elif isinstance(segment, Node):  # (a join mark adds no text)
            slot = len(ranges)
            ranges.append((len(out), -1))
            _serial_ranges(segment, tokenizer, out, ranges)
            ranges[slot] = (ranges[slot][0], len(out))


def reading_tokens(node: Node, tokenizer) -> list[int]:
    """A tree's tokens in reading order, each text piece encoded on its own as training and the
    judge encode it (no control tokens)."""
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
    serial: list[int] = []
    ranges: list[tuple[int, int]] = []
    _serial_ranges(root, tokenizer, serial, ranges)
    if not ranges:
        return []
    shared = len(prompt_ids) + ranges[0][0]  # prompt + answer before the first branch: same in both
    rest = ThreadTokens(serial[ranges[0][0] :], shared, parent=0, fork_pos=shared - 1, first_label=0)
    sample = pack(threads + [rest])
    starts = [0]
    for t in sample.threads:
        starts.append(starts[-1] + len(t.tokens))

    # For each branch: the packed indexes whose logits predict its tokens (all but the first).
    alone_at: list[list[int]] = []
    serial_at: list[list[int]] = []
    for k, (node, (lo, _)) in enumerate(zip(_children(root), ranges)):
        thread_start = starts[k + 1]  # thread k + 1 is the k-th child
        alone, ser = [], []
        thread_idx, read_idx = 0, lo
        for segment in node.segments:
            if isinstance(segment, str):
                n = len(tokenizer.encode(segment, add_special_tokens=False))
                alone += range(thread_start + thread_idx - 1, thread_start + thread_idx + n - 1)
                ser += range(starts[-2] + read_idx - ranges[0][0] - 1, starts[-2] + read_idx - ranges[0][0] + n - 1)
                thread_idx, read_idx = thread_idx + n, read_idx + n
            elif isinstance(segment, Node):  # a grandchild: its own thread; its whole text in the answer
                read_idx += len(reading_tokens(segment, tokenizer))
        alone_at.append(alone[1:])
        serial_at.append(ser[1:])

    wanted = sorted({i for rows in alone_at + serial_at for i in rows})
    if not wanted:
        return [BranchScore(0.0, 0.0) for _ in alone_at]
    row = {i: r for r, i in enumerate(wanted)}
    keep = torch.tensor(wanted)
    logits = model(
        input_ids=sample.input_ids[None], position_ids=sample.position_ids[None],
        attention_mask=sample.attention_bias(torch.float32), logits_to_keep=keep,
    ).logits[0]
    nll = F.cross_entropy(logits.float(), sample.input_ids[keep + 1], reduction="none")
    scores = []
    for alone, ser in zip(alone_at, serial_at):
        if not alone:
            scores.append(BranchScore(0.0, 0.0))
            continue
        a = nll[[row[i] for i in alone]].mean()
        b = nll[[row[i] for i in ser]].mean()
        scores.append(BranchScore(float(a), float(b)))
    return scores


def merge_dependent(root: Node, scores: list[BranchScore], threshold: float = DEFAULT_THRESHOLD) -> Node:
    """The tree with every dependent branch turned back into serial text. A join left with no
    branch to join (all merged back) goes too: the model must not learn to wait for nothing."""
    it = iter(scores)

    def walk(node: Node) -> Node:
        segments: list = []
        branches = 0  # kept since the previous join
        for s in node.segments:
            if not isinstance(s, (str, Node)):  # a join mark stays where it is, if it joins anything
                if branches:
                    segments.append(s)
                branches = 0
                continue
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
                branches += 1
        return Node(segments)

    return walk(root)
