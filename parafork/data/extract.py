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

    def num_joins(self) -> int:
        return sum(1 for s in self.segments if s is JOIN) + sum(c.num_joins() for c in self.children)

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


def rep4(text: str) -> float | None:
    """The share of a text's word 4-grams that repeat an earlier one in it (seq-rep-4 of
    Welleck et al., 2019): 0 for an answer that never repeats itself, near 1 for a loop. NLL
    under the base model rewards loops (a repeat is predictable), so the two read together."""
    words = text.lower().split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else None


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


# A paragraph that closes a prose group by summing it up: it is written after a join, not forked.
CONCLUSION = re.compile(
    r"(?:In (?:conclusion|summary|short|the end)|Overall|All in all|Ultimately|To (?:sum (?:it )?up|summari[sz]e|conclude)"
    r"|By (?:following|using|taking|implementing|incorporating|understanding)|Remember)\b", re.I)
PROSE_BREAK = re.compile(r"\n[ \t]*\n(?=[^\s])")  # a blank line, then an unindented line
TOP_ITEM = re.compile(r"^(?P<marker>\d{1,2}[.)]|[-*•])[ \t]+\S", re.M)


def list_runs(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every run of top-level list items: items of one kind (numbered
    ones counting up by one) with no unindented prose after a blank line between them. A run
    ends where such prose begins, or at the end of its last item's text."""
    runs: list[list] = []
    items = list(TOP_ITEM.finditer(text))
    for i, m in enumerate(items):
        kind = "numbered" if m.group("marker")[0].isdigit() else "bullets"
        number = int(m.group("marker")[:-1]) if kind == "numbered" else None
        block_end = items[i + 1].start() if i + 1 < len(items) else len(text)
        brk = PROSE_BREAK.search(text, m.start(), block_end)
        prose_inside = brk is not None and brk.end() < block_end
        last = runs[-1] if runs else None
        if last and last[3] and last[2] == kind and (kind == "bullets" or number == last[4] + 1):
            last[1], last[4] = m.start(), number  # the run goes on: its end is set below
        else:
            runs.append([m.start(), m.start(), kind, True, number])
        runs[-1][1] = brk.start() if prose_inside else block_end
        runs[-1][3] = not prose_inside  # prose after this item ends the run
    out = []
    for start, end, kind, _, _ in runs:
        tail = re.search(r"\s*$", text[start:end])  # trailing blank lines belong to what follows
        out.append((start, start + tail.start(), kind))
    return out


def _paragraph_group(text: str, closes_answer: bool) -> list[Segment] | None:
    """A prose section as parallel paragraphs (each one's first sentence stays serial), or None
    when fewer than two paragraphs fork. When the section ends the answer and its last
    paragraph sums up (`CONCLUSION`), that paragraph stays serial (after a join: it sees them)."""
    parts = re.split(r"(\n\s*\n)", text)
    last = max((i for i in range(0, len(parts), 2) if parts[i].strip()), default=-1)
    conclusion = closes_answer and last >= 0 and CONCLUSION.match(parts[last].lstrip()) is not None
    segments: list[Segment] = [""]
    forks = 0
    for i, part in enumerate(parts):
        m = SENTENCE_END.search(part) if i % 2 == 0 and not (conclusion and i == last) else None
        head, body = (part[: m.end()], part[m.end() :]) if m else (part, "")
        if m and len(head.strip()) >= MIN_PARAGRAPH_PIECE and len(body.strip()) >= MIN_PARAGRAPH_PIECE and "\n" not in head.strip():
            segments[-1] += head
            segments += [Node([body]), ""]
            forks += 1
        else:
            segments[-1] += part
    return segments if forks >= 2 else None


def answer_layout(answer: str) -> dict:
    """What the benches ask of an answer's text: `closes_after_list`, whether prose follows its
    last list of three or more top-level items (where data v3 puts a join before that prose),
    and `paragraphs`, the paragraphs of an answer with no list at all (0 if it has one)."""
    runs = list_runs(answer)
    lists = [(s, e) for s, e, _ in runs if len(TOP_ITEM.findall(answer, s, e)) >= MIN_ITEMS]
    paragraphs = 0 if runs else sum(1 for part in re.split(r"\n\s*\n", answer) if part.strip())
    return {"closes_after_list": bool(lists) and bool(answer[lists[-1][1] :].strip()), "paragraphs": paragraphs}


def extract_groups(answer: str) -> Extraction:
    """Data v3: an answer as serial text and parallel groups, with joins.

    The answer is cut into runs of top-level list items (`list_runs`) and the prose around
    them. Each run that `_list_tree` takes (three or more items, heads as in v2) is a group; an
    item whose details hold an indented list forks that list too (depth 3). A prose section of
    three or more paragraphs is a group of paragraphs (`_paragraph_group`). Any text after a
    group is written after a join, so it sees the group's bodies: the `JOIN` stands right
    after the group's last child. There, every text piece starts where a token starts in the
    whole answer (after the body's last character); a join after the blank line would leave a
    piece ending in whitespace, which tokenizes differently on its own. Kind: the groups'
    kinds joined by "+", in reading order."""
    reason = rejection(answer)
    if reason:
        return Extraction(None, None, reason)
    segments: list[Segment] = [""]
    kinds: list[str] = []
    group_ends: list[int] = []  # index in `segments` of each group's last child

    def add(group: list[Segment]) -> None:
        for s in group:
            if isinstance(s, str):
                segments[-1] += s
            else:
                segments.extend([s, ""])
        group_ends.append(len(segments) - 2)

    pos = 0
    for start, end, kind in list_runs(answer) + [(len(answer), len(answer), None)]:
        prose = answer[pos:start]
        group = _paragraph_group(prose, closes_answer=kind is None)
        if group is not None:
            add(group)
            kinds.append("paragraphs")
        else:
            segments[-1] += prose
        if kind is None:
            break
        found = _list_tree(answer[start:end], kind)
        if found is None:
            segments[-1] += answer[start:end]
        else:
            add(found[0].segments)
            kinds.append(kind + ("-sentence" if found[1] else ""))
        pos = end
    if not kinds:
        return Extraction(None, None, "no structure")
    for i in reversed(group_ends):
        if Node(segments[i + 1 :]).text().strip():
            segments.insert(i + 1, JOIN)
    root = Node([s for s in segments if s != ""])
    assert root.text() == answer, "a tree must read back as its answer"
    return Extraction("+".join(kinds), root, "ok")


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
