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
