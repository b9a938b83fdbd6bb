"""Paragraph trees from chat answers: the training data of APAR.

A tree is text with holes: a `Node` is a list of segments, each a string or a child
`Node`. Reading the segments depth first gives back the original answer exactly, so the
APAR linear form (root text with `[Fork]` where each child was, each child its own
thread) restores to the answer token for token.

Kinds, tried in this order: a numbered list, a bullet list (each item's head stays in
the parent, its details become a child; a nested list inside the details becomes the
child's own tree), then paragraphs (each paragraph's first sentence stays in the root,
the rest becomes a child). A list item's head is a bold title or text up to a colon; in a
numbered list it may also be a plain first sentence (kind "numbered-sentence"). Answers with code, maths, tables, links, HTML or CJK text are
rejected, as are pieces too short to be worth a thread.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

class JoinMark:
    """Where a thread joins the children it forked before (text after it sees their bodies;
    engine/thread.py, `Join`). In JSON: null. A tree without joins packs as before."""

    _instance = None

    def __new__(cls):
        cls._instance = cls._instance or super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "JOIN"


JOIN = JoinMark()
Segment = Union[str, "Node", JoinMark]

MIN_ITEMS = 3  # list items (reference)
MIN_LIST_PIECE = 10  # chars, head or details of a list item (reference)
MIN_PARAGRAPHS = 3
MIN_PARAGRAPH_PIECE = 20  # chars, head or body of a paragraph (reference)

REJECT = {
    "code": re.compile(r"```|~~~|^    \S", re.M),
    "maths": re.compile(r"\$\$|\\\(|\\\[|\\frac|\\sum"),
    "table": re.compile(r"^\s*\|.*\|\s*$", re.M),
    "url": re.compile(r"https?://|www\.", re.I),
    "html": re.compile(r"</?[a-zA-Z][^>]*>"),
    "rule": re.compile(r"^\s*(?:---+|\*\*\*+|===+)\s*$", re.M),
    "cjk": re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]"),
}

ITEM = {
    "numbered": re.compile(r"^(?P<indent>[ \t]*)(?P<marker>\d{1,2}[.)])[ \t]+\S", re.M),
    "bullets": re.compile(r"^(?P<indent>[ \t]*)(?P<marker>[-*•])[ \t]+\S", re.M),
}
# A head: a bold title (optionally followed by a colon), or plain text up to a colon.
BOLD_HEAD = re.compile(r"\*\*[^*\n]{2,100}?\*\*:?|__[^_\n]{2,100}?__:?")
COLON_HEAD = re.compile(r"[^\n:]{2,100}?:(?=\s)")
SENTENCE_END = re.compile(r"[.!?](?=\s)")
MAX_SENTENCE_HEAD = 150  # chars: a longer first sentence is a body, not a head


@dataclass
class Node:
    segments: list[Segment]

    def text(self) -> str:
        return "".join(s if isinstance(s, str) else s.text() for s in self.segments if s is not JOIN)

    @property
    def children(self) -> list[Node]:
        return [s for s in self.segments if isinstance(s, Node)]

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children), default=0)

    def num_threads(self) -> int:
        return 1 + sum(c.num_threads() for c in self.children)

    def to_json(self) -> list:
        return [s if isinstance(s, str) else None if s is JOIN else s.to_json() for s in self.segments]

    @classmethod
    def from_json(cls, data: list) -> Node:
        return cls([s if isinstance(s, str) else JOIN if s is None else cls.from_json(s) for s in data])


@dataclass
class Extraction:
    kind: str | None  # "numbered", "numbered-sentence", "bullets", "paragraphs", or None when rejected
    root: Node | None
    reason: str  # why it was rejected, or "ok"


def rejection(answer: str) -> str | None:
    for name, pattern in REJECT.items():
        if pattern.search(answer):
            return name
    return None


def _split_item(body: str, sentences: bool) -> tuple[str, str, bool] | None:
    """(head, details, whether the head is a plain sentence) of one list item's text after
    its marker, or None."""
    for pattern in (BOLD_HEAD, COLON_HEAD):
        m = pattern.match(body)
        if m:
            return body[: m.end()], body[m.end() :], False
    m = SENTENCE_END.search(body) if sentences else None
    if m and m.end() <= MAX_SENTENCE_HEAD and "\n" not in body[: m.end()]:
        return body[: m.end()], body[m.end() :], True
    return None


def _list_tree(text: str, kind: str) -> tuple[Node, bool] | None:
    """The list of `kind` at the top indentation of `text` as a tree, and whether any of its
    heads (nested lists included) is a plain sentence; or None."""
    items = [m for m in ITEM[kind].finditer(text) if m.group("indent") == ""]
    if len(items) < MIN_ITEMS:
        return None
    if kind == "numbered":
        numbers = [int(m.group("marker")[:-1]) for m in items]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            return None
    segments: list[Segment] = [text[: items[0].start()]]
    any_sentence = False
    for i, m in enumerate(items):
        block = text[m.start() : items[i + 1].start() if i + 1 < len(items) else len(text)]
        rest = ""
        if i + 1 == len(items):
            # The last item ends at the first blank line followed by unindented prose.
            tail = re.search(r"\n\s*\n(?=\S)", block)
            if tail:
                block, rest = block[: tail.start()], block[tail.start() :]
        stripped = block.rstrip()
        start = m.end() - 1 - m.start()  # the item's first character after its marker
        split = _split_item(stripped[start:], sentences=kind == "numbered")
        if split is None:
            return None
        head, details, sentence = split
        if len(stripped[:start] + head) < MIN_LIST_PIECE or len(details.strip()) < MIN_LIST_PIECE:
            return None
        nested = _nested(details)
        any_sentence |= sentence or (nested is not None and nested[1])
        segments[-1] += stripped[:start] + head
        segments.append(nested[0] if nested else Node([details]))
        segments.append(block[len(stripped) :] + rest)
    return Node(segments), any_sentence


def _nested(details: str) -> tuple[Node, bool] | None:
    """A list indented inside an item's details, as the child's own tree (depth 2+)."""
    lines = details.split("\n")
    indents = [len(l) - len(l.lstrip()) for l in lines[1:] if l.strip()]
    if not indents or min(indents) == 0:
        return None
    width = min(indents)
    pad = next(l[:width] for l in lines[1:] if l.strip())  # spaces or tabs, as written
    dedented = "\n".join([lines[0]] + [l[width:] for l in lines[1:]])
    for kind in ITEM:
        found = _list_tree(dedented, kind)
        if found is not None:
            tree = _reindent(found[0], pad)
            # Blank or under-indented lines do not survive the round trip: keep such details flat.
            return (tree, found[1]) if tree.text() == details else None
    return None


def _reindent(node: Node, pad: str) -> Node:
    """Puts back the indentation that `_nested` removed, so text stays exact."""
    out: list[Segment] = []
    for s in node.segments:
        out.append(s.replace("\n", "\n" + pad) if isinstance(s, str) else s if s is JOIN else _reindent(s, pad))
    return Node(out)


def _paragraph_tree(text: str) -> Node | None:
    parts = re.split(r"(\n\s*\n)", text)
    paragraphs = parts[0::2]
    if len([p for p in paragraphs if p.strip()]) < MIN_PARAGRAPHS:
        return None
    segments: list[Segment] = [""]
    forks = 0
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a separator stays serial
            segments[-1] += part
            continue
        m = SENTENCE_END.search(part)
        head, body = (part[: m.end()], part[m.end() :]) if m else (part, "")
        if len(head) >= MIN_PARAGRAPH_PIECE and len(body.strip()) >= MIN_PARAGRAPH_PIECE:
            segments[-1] += head
            segments.append(Node([body]))
            segments.append("")
            forks += 1
        else:
            segments[-1] += part
    return Node(segments) if forks >= 2 else None


def extract(answer: str) -> Extraction:
    reason = rejection(answer)
    if reason:
        return Extraction(None, None, reason)
    for kind in ITEM:
        found = _list_tree(answer, kind)
        if found is not None:
            tree, sentence_heads = found
            kind += "-sentence" if sentence_heads else ""
            break
    else:
        kind, tree = "paragraphs", _paragraph_tree(answer)
    if tree is None:
        return Extraction(None, None, "no structure")
    assert tree.text() == answer, "a tree must read back as its answer"
    return Extraction(kind, tree, "ok")
