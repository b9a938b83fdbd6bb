"""Budget-aware forking: plan `max_tokens` so that bodies are not cut in the middle of the text.

`max_tokens` covers every thread of a request. If it runs out while children are still
writing, their bodies end mid-sentence *inside* the restored answer, followed by the
parent's later items (18 of 41 forking Vicuna answers, measured at c64bd53). Two rules,
on while `SamplingParams.plan_budget` (the default):

- **fork only with room**: a thread may sample `[Fork]` only while the budget left covers
  what its request's live children still need, a new child's expected body, the `[Fork]`
  itself and `PARENT_RESERVE` tokens for the parent's own next head;
- **parents wait near the end**: a thread with live descendants is not scheduled while the
  budget left is no more than those descendants still need, so they finish first and the
  budget, if it runs out at all, runs out at the end of the text.

A child's expected body is the mean length (own tokens: `[Child]`, body, end token) of the
request's children that finished so far, `DEFAULT_BODY_TOKENS` before any has. A child
still needs max(expected - written, written / 2): one that has outgrown the mean is likely
to go on for a while. (With a floor of 1 token, then of expected / 4, the bundled model's
demo answer still had its root write two more items while an overlong body ran into the
budget.) When a body runs far longer than expected the budget can still run out inside the
answer; `finish_reason` is then "length".
"""
from __future__ import annotations

from .thread import FinishReason, Request, Thread

DEFAULT_BODY_TOKENS = 40  # a list item's body in the bundled model's answers is ~20-60 tokens
PARENT_RESERVE = 8  # tokens a forking parent keeps for its next head


def expected_body(request: Request) -> float:
    done = [len(t.own_tokens) for t in request.threads if t.parent is not None and t.finish_reason == FinishReason.STOP]
    return sum(done) / len(done) if done else DEFAULT_BODY_TOKENS


def _need(threads, expected: float) -> float:
    return sum(max(expected - len(t.own_tokens), len(t.own_tokens) / 2) for t in threads)


def may_fork(thread: Thread, extra: int = 0) -> bool:
    """Whether the budget left has room for another body (and `extra` tokens before its fork)."""
    request = thread.request
    if not request.params.plan_budget:
        return True
    expected = expected_body(request)
    live_children = [t for t in request.threads if t.parent is not None and not t.finished]
    return request.tokens_left >= _need(live_children, expected) + expected + 1 + PARENT_RESERVE + extra


def waits_for_descendants(thread: Thread) -> bool:
    """True while `thread` should wait for its live descendants (see the module's rules)."""
    request = thread.request
    if not thread.children or not request.params.plan_budget:
        return False  # a thread that never forked has nothing to wait for (the common, cheap case)
    descendants = []
    for t in request.threads:
        if t.finished or t is thread:
            continue
        ancestor = t.parent
        while ancestor is not None and ancestor is not thread:
            ancestor = ancestor.parent
        if ancestor is thread:
            descendants.append(t)
    return bool(descendants) and request.tokens_left <= _need(descendants, expected_body(request))
