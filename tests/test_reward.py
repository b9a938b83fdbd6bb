"""Model v4's reward: the critical path from the tree, and gates before any speed is paid."""
from parafork import models
from parafork.data import reward


def _tree(tokens, children=None):
    return {"tokens": tokens, "children": {str(i): c for i, c in (children or {}).items()}}


def test_critical_steps_follow_the_engines_schedule():
    assert reward.critical_steps(_tree([1, 2, 3])) == 3  # serial: one token a step
    # Root forks at its own index 1: the child's [Child] is fed at step 3 with the root's next
    # token, its tokens come at steps 3, 4, 5, 6; the root ends at step 4.
    child = _tree([9, 5, 5, 5, 5])
    assert reward.critical_steps(_tree([1, 7, 2, 3], {1: child})) == 1 + 1 + 4
    # Nested: a grandchild forked at the child's own index 2.
    nested = _tree([9, 5, 7, 5], {2: _tree([9, 6, 6, 6, 6, 6])})
    assert reward.critical_steps(_tree([1, 7, 2], {1: nested})) == 2 + 2 + 5


def test_speed_is_paid_only_past_every_gate_and_centred_per_prompt(base_dir):
    tokenizer, control = models.load_tokenizer(base_dir)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    body = "Sleep is important for health and mood every single day."
    other = "Bright evenings keep the brain awake, so dim lamps after sunset."
    ref_text = f"Here are tips:\n\n1. Routine: {body}\n2. Light: {other} Avoid screens."
    reference = {"kind": "ar_greedy", "token_ids": enc(ref_text), "finish_reason": "stop", "tree": _tree(enc(ref_text))}

    def apar(children_tokens, finish="stop", extra=""):
        head = enc("Here are tips:\n\n1. Routine:")
        root = head + [control.fork_id] + enc("\n2. Light:") + [control.fork_id] + enc(extra)
        kids = {len(head): _tree([control.child_id] + enc(" " + children_tokens[0])),
                len(head) + 1 + len(enc("\n2. Light:")): _tree([control.child_id] + enc(" " + children_tokens[1]))}
        text_ids = enc("Here are tips:\n\n1. Routine: " + children_tokens[0] + "\n2. Light: " + children_tokens[1] + extra)
        return {"kind": "apar", "token_ids": text_ids, "finish_reason": finish, "tree": _tree(root, kids)}

    good = apar([body, other + " Avoid screens."])
    cut = apar([body, other + " Avoid screens."], finish="length")
    short = apar(["Yes.", other + " Avoid screens. Keep phones out of the bedroom too."])
    row = {"samples": [reference, good, cut, short]}
    scores = reward.score_prompt(row, tokenizer, control)
    assert scores[0].failed == [] and scores[0].speed > 1.2  # two bodies beside the heads
    assert scores[1].failed == ["cut"] and scores[2].failed[0] == "short branch"
    assert scores[0].reward == 0.0  # the only passing sample: centred on itself
    assert scores[1].reward == scores[2].reward == reward.FAIL_REWARD  # speed is never paid past a failed gate
    assert reward.score_prompt(row, tokenizer, control, similarity=lambda a, b: 0.1)[0].failed == ["content"]
    # Paragraph heads repeated before their forks (no list marker) fail too.
    para = enc("Objects:")
    twice = {"kind": "apar", "finish_reason": "stop", "token_ids": good["token_ids"],
             "tree": _tree(para + [control.fork_id] + enc("\n\nObjects:") + [control.fork_id],
                           {len(para): _tree([control.child_id] + enc(" " + body)),
                            len(para) + 1 + len(enc("\n\nObjects:")): _tree([control.child_id] + enc(" " + other))})}
    assert "repeated heads" in reward.score_prompt({"samples": [reference, twice]}, tokenizer, control)[0].failed


def test_a_rollout_tree_becomes_a_training_tree_with_its_closing_paragraph_joined(base_dir):
    from parafork.data.extract import JOIN
    from parafork.data.independence import reading_tokens

    tokenizer, control = models.load_tokenizer(base_dir)
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    head1, head2 = enc("Tips:\n\n1. Routine:"), enc("\n2. Light:")
    closing = enc("\n\nIn short, a steady routine and dim evenings help most people fall asleep sooner.")
    body1, body2 = enc(" Go to bed at the same time."), enc(" Dim the lamps after dark.")
    root = head1 + [control.fork_id] + head2 + [control.fork_id] + closing + [min(control.eos_ids)]
    tree = _tree(root, {len(head1): _tree([control.child_id] + body1 + [min(control.eos_ids)]),
                        len(head1) + 1 + len(head2): _tree([control.child_id] + body2 + [min(control.eos_ids)])})
    node = reward.node_of(tree, tokenizer, control)
    assert [type(s).__name__ if s is not JOIN else "JOIN" for s in node.segments] == \
        ["str", "Node", "str", "Node", "JOIN", "str"]
    assert reading_tokens(node, tokenizer) == head1 + body1 + head2 + body2 + closing  # the sample's own tokens
    short = _tree(head1 + [control.fork_id] + enc("\n\nDone."), {len(head1): _tree([control.child_id] + body1)})
    assert JOIN not in reward.node_of(short, tokenizer, control).segments  # too short to be a closing paragraph
