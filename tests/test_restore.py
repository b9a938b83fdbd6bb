"""Restoration: trees of threads, linearised, come back as the original text."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parafork.restore import linearize
from parafork.tokens import ControlTokens

CT = ControlTokens(fork_id=900, child_id=901, eos_ids=frozenset({2}), join_id=902)


@dataclass
class Node:
    own_tokens: list[int]
    children: dict[int, "Node"] = field(default_factory=dict)
    finished: bool = True


# A tree in document form: a list of pieces, each a run of text tokens or a subtree.
text_run = st.lists(st.integers(3, 800), min_size=1, max_size=6)
tree = st.recursive(
    st.lists(text_run, min_size=1, max_size=3),
    lambda sub: st.lists(st.one_of(text_run, sub), min_size=1, max_size=4),
    max_leaves=12,
)


def flatten(doc) -> list[int]:
    out: list[int] = []
    for piece in doc:
        out.extend(flatten(piece) if isinstance(piece[0], list) else piece)
    return out


def to_threads(doc, is_child: bool) -> Node:
    """The APAR linear form: a subtree is replaced by [Fork] and becomes a child thread
    whose tokens are [Child] + its own pieces + end-of-sequence."""
    node = Node([CT.child_id] if is_child else [])
    for piece in doc:
        if isinstance(piece[0], list):
            node.children[len(node.own_tokens)] = to_threads(piece, True)
            node.own_tokens.append(CT.fork_id)
        else:
            node.own_tokens.extend(piece)
    if is_child:
        node.own_tokens.append(2)
    return node


@settings(max_examples=300, deadline=None)
@given(doc=tree)
def test_random_trees_restore_to_the_original_tokens(doc):
    root = to_threads(doc, False)
    tokens, complete = linearize(root, CT)
    assert tokens == flatten(doc)
    assert complete
    assert not {CT.fork_id, CT.child_id} & set(tokens)


@settings(max_examples=200, deadline=None)
@given(doc=tree, data=st.data())
def test_final_prefix_is_a_prefix_and_grows_to_the_whole(doc, data):
    root = to_threads(doc, False)
    nodes = []

    def walk(n):
        nodes.append(n)
        for c in n.children.values():
            walk(c)

    walk(root)
    open_nodes = data.draw(st.lists(st.sampled_from(nodes), unique_by=id))
    for n in open_nodes:
        n.finished = False
    prefix, complete = linearize(root, CT, final_only=True)
    full = flatten(doc)
    assert full[: len(prefix)] == prefix
    assert complete == (not open_nodes)
    if not open_nodes:
        assert prefix == full


def test_final_prefix_stops_at_the_first_unfinished_thread_in_reading_order():
    child1 = Node([CT.child_id, 11, 12], finished=False)
    child2 = Node([CT.child_id, 21, 2])
    root = Node([5, CT.fork_id, 6, CT.fork_id, 7], {1: child1, 3: child2})
    assert linearize(root, CT, final_only=True) == ([5, 11, 12], False)
    child1.own_tokens.append(2)
    child1.finished = True
    assert linearize(root, CT, final_only=True) == ([5, 11, 12, 6, 21, 7], True)


@pytest.mark.model
def test_real_text_round_trips_through_threads(base_llm):
    tok = base_llm.tokenizer
    ct = base_llm.control
    head = "Tips for sleep:\n\n1. **Keep a schedule:**"
    body1 = " Go to bed at the same time every night, even on weekends."
    mid = "\n\n2. **Limit screens:**"
    body2 = " Blue light from phones delays sleep; put them away an hour before bed. 😴"
    tail = "\n\nSleep well!"
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    c1 = Node([ct.child_id] + ids(body1) + [tok.eos_token_id])
    c2 = Node([ct.child_id] + ids(body2) + [tok.eos_token_id])
    root_tokens = ids(head) + [ct.fork_id] + ids(mid) + [ct.fork_id] + ids(tail)
    f1 = len(ids(head))
    f2 = f1 + 1 + len(ids(mid))
    root = Node(root_tokens, {f1: c1, f2: c2})
    tokens, _ = linearize(root, ct)
    assert tok.decode(tokens) == head + body1 + mid + body2 + tail
