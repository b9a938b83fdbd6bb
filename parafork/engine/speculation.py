"""Speculative decoding inside threads: n-gram drafts verified in the step's one forward.

A thread whose context is cached up to its last token may feed, with that token, a **draft**
of up to k tokens guessed by prompt lookup (vLLM's `ngram` method, here per thread): the
longest suffix of its context (`NGRAM_MAX` down to `NGRAM_MIN` tokens) that occurred before,
first in what the thread sees (prompt, ancestors up to its fork, its own tokens), then in
its request's other threads (siblings write similar phrases); the draft is the k tokens that
followed the most recent occurrence. The runner returns logits at every fed position, and
the engine samples position by position exactly as it would without a draft (the same APAR
rules, penalties and logits rules over the thread's tokens so far, the same generator
draws), accepting each draft token the sample equals. The first sample that differs, or
the one after the last draft token, is the step's last token for the thread. So a step
still adds at least one token per thread, and greedy output is the same token for token.

**Temperature > 0.** Accepting draft token d exactly when a sample t ~ p equals d is the
rejection-sampling rule for a draft that is a point mass: d is accepted with probability
p(d), and a rejection yields a token drawn from the residual (p - 1_d)+, i.e. p without d,
renormalized. Every position's token is therefore distributed as p, as in plain sampling;
and since it spends one draw per position, as plain sampling does, a seeded request gives
the same text with and without lookup's drafts. (A trained head's drafts for a sampled
request are drawn from its distribution instead, and settled by the general rule against it:
sampler.settle_offer, eagle.py.)

**Where acceptance stops.** After `[Fork]`, `[Child]` or an end token, and where the
request's `max_tokens` or the model's context would be reached: forks, thread ends and the
budget are settled at the end of a step, as without drafts. The draft itself stops after
such a token.

**Rejected positions.** Their K/V were written; the thread's block table is cut back to the
blocks its cached tokens and the next one need (the rest go back to the pool), and the
runner drops what lies beyond (`Runner.truncate`). Prefix-cache keys are registered only
for verified tokens.

**How long a draft.** A draft token costs a fed row; whether it pays depends on how often
drafts are accepted and on what else the step computes. Each thread keeps a decayed count of
accepted draft tokens and of rejections, which gives a per-token acceptance estimate a (prior
1/2). Each step, the proposed drafts (up to `num_draft_tokens` each) are cut to the lengths
that maximize the whole step's expected tokens per cost (`draft_lengths`), a step's cost
against its rows measured on this machine at start-up (step_cost.py; the runner's fixed
`RunnerInfo.draft_row_cost` where steps cannot be timed). A thread given no draft tokens has its counts decay back toward
the prior, so it tries again later.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .step_cost import StepCost
    from ..tokens import ControlTokens
    from .thread import Thread

NGRAM_MAX = 4  # longest context suffix looked up
# Shortest. Measured on 6 Vicuna questions (bundled model, apar, 512 tokens, AMD EPYC AVX2 fp32):
# minimum 1/2/3 gave 21.8/21.8/19.7 tok/s against 18.0 without drafts, 2 with 41% fewer draft
# tokens than 1 (acceptance 41% vs 29%), which counts where rows are dear (llama.cpp).
NGRAM_MIN = 2
def chain_gains(acceptance: float, length: int) -> list[float]:
    """Each token's chance to be accepted, all before it accepted too, for a thread whose draft
    tokens are each accepted with probability `acceptance`: a, a^2, ..."""
    a = min(acceptance, 0.999)
    return [a ** j for j in range(1, length + 1)]


def draft_lengths(candidates: list[list[float]], sampling: int, rows: int, cost_of: StepCost,
                  fixed_rows: int = 0) -> list[int]:
    """How many tokens of each proposed draft to feed this step.

    `candidates`: per thread with a proposal, each draft token's chance to be accepted (with
    every token before it: non-increasing; `chain_gains` for n-gram drafts, the head's running
    confidence for a trained head's: eagle.py);
    `sampling`: threads that sample this step (one expected token each); `rows`: tokens fed
    before any draft; `cost_of`: a step's cost against its rows, in one-row steps (step_cost.py);
    `fixed_rows`: of `rows`, those that make no token this step (a prompt's chunk): the step pays
    for them whatever is drafted, so the tokens are weighed against what the rest costs,
    `decode_cost` (counted whole, a 100-row prompt chunk beside 16 decode rows made each token
    look worth 8x a row on the Zen 4's curve, and at 16 clients the head ran in such steps).
    Draft tokens are added in order of expected gain while each raises the step's expected tokens per cost, i.e. while
    gain / (the next row's cost) > tokens / cost. In a wide batch a draft token has to beat the tokens per
    cost the whole batch already makes, not a lone thread's: with 12 APAR threads and rows at
    0.08, a first draft token needs a > 0.5 (measured: per-thread sizing as if alone fed
    12-thread answers drafts at 28% acceptance and made them 0.77x as fast)."""
    gains = sorted(((g, i) for i, chain in enumerate(candidates) for g in chain), reverse=True)
    tokens, cost = float(sampling), decode_cost(cost_of, rows, fixed_rows)
    lengths = [0] * len(candidates)
    for gain, i in gains:
        row_cost = cost_of.marginal(rows)
        if gain * cost <= row_cost * tokens:
            break
        lengths[i] += 1
        tokens, cost, rows = tokens + gain, cost + row_cost, rows + 1
    return lengths


def decode_cost(cost_of: StepCost, rows: int, fixed_rows: int) -> float:
    """What the rows that make tokens add to a step of `rows` rows, `fixed_rows` of which make
    none (one-row steps): the whole step where there are none. Never zero: on a flat stretch of
    the curve those rows are free, and so is a draft's row (it is fed)."""
    return max(cost_of(rows) - cost_of(fixed_rows), 1e-9) if fixed_rows else cost_of(rows)


def _pack(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


def _follows(haystack: bytes, needle: bytes, end: int) -> int | None:
    """Token index just after the last 4-byte-aligned occurrence of `needle` ending before
    byte `end` of `haystack`, or None."""
    while True:
        at = haystack.rfind(needle, 0, end)
        if at < 0:
            return None
        if at % 4 == 0:
            return (at + len(needle)) // 4
        end = at + len(needle) - 1


def propose(thread: Thread, k: int, control: ControlTokens) -> list[int]:
    """Up to `k` draft tokens for `thread` (empty: no n-gram of its context recurs)."""
    context = thread.token_ids
    if k <= 0 or len(context) <= NGRAM_MIN:
        return []
    own = _pack(context)
    others: list[tuple[list[int], bytes]] | None = None
    for n in range(min(NGRAM_MAX, len(context) - 1), NGRAM_MIN - 1, -1):
        needle = own[-4 * n :]
        start = _follows(own, needle, len(own) - 4)  # an occurrence before the suffix itself
        if start is not None:
            return _cut(context[start : start + k], control)
        if others is None:
            others = [(t.own_tokens, _pack(t.own_tokens)) for t in thread.request.threads if t is not thread]
        for tokens, packed in others:
            start = _follows(packed, needle, len(packed))
            if start is not None and start < len(tokens):
                return _cut(tokens[start : start + k], control)
    return []


def _cut(draft: list[int], control: ControlTokens) -> list[int]:
    """The draft ends after a fork, join or end token and before a `[Child]` (never sampled)."""
    for i, token in enumerate(draft):
        if token == control.child_id:
            return draft[:i]
        if token in (control.fork_id, control.join_id) or token in control.eos_ids:
            return draft[: i + 1]
    return draft
