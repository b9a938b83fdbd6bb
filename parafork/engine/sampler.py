"""The APAR decoding rules and the sampler: one token per thread from its logits row.

Order per step: the model's own log-probabilities are read first (for `logprobs`), then
penalties, the APAR rules and `logit_bias`, the request's logits rules, and the sample.
Kept apart from `SamplingParams` (the public request parameters) so that the policy
that walks engine threads lives inside the engine.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from ..sampling import FORKING_MODES
from ..tokens import ControlTokens
from .budget import may_fork
from .thread import Thread


def apply_apar_rules(
    logits: torch.Tensor, threads: Sequence[Thread], control: ControlTokens, fork_room: int | None = None
) -> None:
    """The decoding rules of APAR, in place on `[B, V]` logits.

    `[Child]` is never sampled. `[Fork]` is banned in AR mode, right after `[Fork]`/`[Child]`,
    at the depth cap (a thread of depth d may fork only if d + 1 < max_depth), when the
    request already has max_threads threads, when the budget left has no room for another
    body (`budget.py`), and for all but the first `fork_room` threads
    that may fork (the runner's free sequence ids; None: no limit). Raw mode leaves
    `[Fork]` to the caller. `[Join]` may be sampled only by a thread of a request that joins
    (`SamplingParams.join`, forking modes) that has children it has not joined yet; so a
    request that does not join decodes exactly as if the token did not exist. Then each
    request's `logit_bias` is added.
    """
    logits[:, control.child_id] = float("-inf")
    no_join = [i for i, t in enumerate(threads) if not (t.request.params.joins and t.unjoined_children())]
    if no_join:
        logits[no_join, control.join_id] = float("-inf")
    no_fork = [i for i, t in enumerate(threads) if _fork_banned(t, control)]
    if fork_room is not None:
        may_fork = [i for i, t in enumerate(threads) if i not in no_fork and t.request.params.mode in FORKING_MODES]
        no_fork += may_fork[max(fork_room, 0) :]
    if no_fork:
        logits[no_fork, control.fork_id] = float("-inf")
    for i, t in enumerate(threads):
        bias = t.request.params.logit_bias
        if bias:
            logits[i, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype)


def apply_penalties(logits: torch.Tensor, threads: Sequence[Thread], control: ControlTokens) -> None:
    """Repetition control per thread, in place, over the tokens that thread sees (its context:
    ancestors up to its fork, then its own; never a sibling's). `[Fork]`/`[Child]` are never
    penalized (nor `[Join]`), so penalties do not discourage forking.

    - `frequency_penalty` f, `presence_penalty` p (OpenAI): over answer tokens (not the prompt),
      logit -= f * count + p * (count > 0);
    - `repetition_penalty` r (vLLM, CTRL): over prompt and answer tokens, a seen token's logit
      is divided by r where positive, multiplied by r where negative.

    Cost, for penalized requests only: counting the thread's answer tokens in Python and one
    numpy update of the seen tokens' logits (float32, as before). Measured on the bundled model
    over llama.cpp (Intel Xeon, 2 threads): this costs ~0.15 ms a step where the torch version
    (a full-vocabulary bincount and per-token torch ops) cost 0.4-0.5 ms, 3% of a 15 ms decode
    step: right after a decode every op runs on caches the decode has flushed, so few ops win.
    """
    for i, thread in enumerate(threads):
        params = thread.request.params
        if not params.penalized:
            continue
        penalize_row(logits[i].numpy(), thread.token_ids, len(thread.request.prompt_token_ids), control.ids,
                     params.frequency_penalty, params.presence_penalty, params.repetition_penalty)


class SeenTokens:
    """What the penalties of `apply_penalties` read of a context that only grows: how often each
    answer token occurs (frequency, presence) and which tokens occur at all (repetition),
    control tokens left out. `extend` adds the context's next tokens; `penalize` edits one
    float32 row in place. `penalize_row` builds one over a whole context; the vLLM plugin keeps
    one per request and extends it by what the request sampled since (O(new tokens) a step,
    not O(context))."""

    def __init__(self, answer_start: int, control_ids: Sequence[int], repetition: bool = True) -> None:
        self.answer_start, self.control = answer_start, tuple(control_ids)
        self.length = 0  # context tokens added so far
        self.counts: Counter = Counter()  # answer tokens
        self.seen: set[int] | None = set() if repetition else None  # prompt and answer tokens

    def extend(self, tokens: Sequence[int]) -> None:
        answer_from = max(0, self.answer_start - self.length)
        if len(tokens) > answer_from:
            self.counts.update(tokens[answer_from:])
            for token in self.control:
                self.counts.pop(token, None)
        if self.seen is not None:
            self.seen.update(tokens)
            self.seen.difference_update(self.control)
        self.length += len(tokens)

    def penalize(self, row: np.ndarray, frequency: float, presence: float, repetition: float) -> None:
        if repetition != 1:
            assert self.seen is not None, "built without the seen set: SeenTokens(..., repetition=True)"
            seen = np.fromiter(self.seen, dtype=np.int64, count=len(self.seen))
            values, r = row[seen], np.float32(repetition)
            row[seen] = np.where(values > 0, values / r, values * r)
        if frequency or presence:
            counts = self.counts
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            row[ids] -= np.float32(frequency) * n + np.float32(presence)


def penalize_row(row: np.ndarray, context: Sequence[int], answer_start: int, control_ids: Sequence[int],
                 frequency: float, presence: float, repetition: float) -> None:
    """The penalties of `apply_penalties` on one float32 row (edited in place) for a thread whose
    context (what it sees) is `context`, the answer starting at `answer_start`."""
    seen = SeenTokens(answer_start, control_ids, repetition=repetition != 1)
    seen.extend(context)
    seen.penalize(row, frequency, presence, repetition)


def model_logprobs(logits: torch.Tensor, threads: Sequence[Thread]) -> dict[int, torch.Tensor]:
    """Log-softmax of the raw logits rows of the threads whose request asks for `logprobs`."""
    rows = [i for i, t in enumerate(threads) if t.request.params.logprobs is not None]
    return dict(zip(rows, torch.log_softmax(logits[rows], dim=-1))) if rows else {}


def token_logprob(row: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The sampled token's log-probability and the `top` most likely (token, log-probability)."""
    best = row.topk(top) if top else None
    alternatives = [(int(i), float(v)) for v, i in zip(best.values, best.indices)] if best is not None else []
    return float(row[token]), alternatives


def _fork_banned(thread: Thread, control: ControlTokens) -> bool:
    params = thread.request.params
    if params.mode not in FORKING_MODES:
        return params.mode == "ar"
    return (
        thread.last_token in (control.fork_id, control.child_id)
        or thread.depth + 1 >= params.max_depth
        or len(thread.request.threads) >= params.max_threads
        or not may_fork(thread)
    )


def sample(logits: torch.Tensor, threads: Sequence[Thread],
           offers: Sequence[tuple[int, torch.Tensor] | None] | None = None) -> list[int]:
    """One token per row: argmax for greedy requests, temperature + top-p otherwise (`draw`).
    (numpy's argmax: 4 us for a 49k row where torch's takes 76 us, 0.5% of a llama.cpp step;
    both return the first maximum.) `offers`: per row, None or the draft tokens drawn for it and
    the distribution they were drawn from, settled by `settle_offer` (sampled rows only)."""
    chosen = logits.numpy().argmax(axis=-1).tolist()
    for i, thread in enumerate(threads):
        params = thread.request.params
        if params.greedy:
            continue
        probs = torch.softmax(logits[i] / params.temperature, dim=-1)
        offer = offers[i] if offers is not None else None
        if offer is not None:
            chosen[i] = settle_offer(probs, params.top_p, *offer, thread.generator)
        else:
            chosen[i] = draw(probs, params.top_p, float(torch.rand(1, generator=thread.generator)))
    return chosen


def settle_offer(probs: torch.Tensor, top_p: float, tokens: Sequence[int], q: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """The token of a row whose draft tokens were drawn from a distribution q over the vocabulary
    (a trained head's, at the request's temperature), one after another without replacement
    (the chain's token, then its siblings: eagle.py): the speculative-sampling rule (Leviathan
    et al. 2023; Chen et al. 2023), applied recursively (Jeon et al. 2024, without replacement).
    With p the row's own distribution (`probs` cut to its top-p nucleus) as the first target r
    and q as the first proposal s, candidate d is kept with probability min(1, r(d) / s(d)); else
    r becomes the residual max(0, r - s), renormalized (which never holds d), and s becomes s
    without d, renormalized (what the next candidate was drawn from). After the last candidate
    the token is drawn from r. Either way the token is distributed as p, and it equals a
    candidate exactly when that candidate was kept. A lone drawn draft is kept with probability
    sum(min(p, q)), where a point-mass draft of q's most likely token is kept with p(that token):
    on held-out answers of the bundled model at temperature 1.0, the shipped head's first draft
    token 0.40 against 0.30 (its card: draft/train.py `evaluate`)."""
    if top_p < 1:
        ids, kept = _nucleus(probs, top_p)
        probs = torch.zeros_like(probs).index_put_((ids,), kept / kept.sum())
    target, proposal = probs, q
    for k, token in enumerate(tokens):
        if float(torch.rand(1, generator=generator)) * float(proposal[token]) < float(target[token]):
            return token
        residual = (target - proposal).clamp_(min=0)
        if not residual.sum() > 0:  # (r <= s everywhere only by rounding: d would have been kept)
            break
        target = residual / residual.sum()
        if k + 1 < len(tokens):
            proposal = proposal.clone()
            proposal[token] = 0
            proposal /= proposal.sum()
    return _inverse_cdf(target.cumsum(0), float(torch.rand(1, generator=generator)))


# Candidates a top-p draw looks at first: the nucleus is found among the largest 256
# probabilities (topk: ~0.1 ms over 49,152 on the Zen 4), and only where they are all kept, and
# so might not hold it, by a full sort (3.4 ms; a topk of all of them takes longer).
NUCLEUS_CANDIDATES = 256


def draw(probs: torch.Tensor, top_p: float, u: float) -> int:
    """The token sampled from `probs` (a distribution over the vocabulary) cut to its top-p
    nucleus, by inverse transform: the token whose stretch of the cumulative distribution holds
    `u` (uniform in [0, 1)) times the kept mass. One uniform a token, as `torch.multinomial`,
    at a tenth of its cost: measured on the Zen 4 (2 threads, 49,152 tokens), multinomial took
    1.0 ms a row and top-p's full sort 3.4 ms, where softmax, cumsum and a binary search take
    ~0.1 ms and the nucleus's topk ~0.1 ms; at temperature > 0 every token, and every verified
    draft position, pays it. The nucleus is the smallest set of most likely tokens whose mass
    reaches `top_p` (the most likely one always in)."""
    if top_p < 1:
        ids, kept = _nucleus(probs, top_p)
        return int(ids[_inverse_cdf(kept.cumsum(0), u)])
    return _inverse_cdf(probs.cumsum(0), u)


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus: its token ids and probabilities, most likely first."""
    values, ids = torch.topk(probs, min(NUCLEUS_CANDIDATES, len(probs)))  # most likely first
    mass = values.cumsum(0)
    if mass[-1] < top_p and len(values) < len(probs):  # the nucleus may be wider than the candidates
        values, ids = probs.sort(descending=True)
        mass = values.cumsum(0)
    # A token is kept while the mass before it is under top_p: a prefix.
    kept = int(((mass - values) < top_p).sum())
    return ids[:kept], values[:kept]


def _inverse_cdf(cdf: torch.Tensor, u: float) -> int:
    """The index whose stretch [cdf[i-1], cdf[i]) holds u * cdf[-1]: never a zero-probability one
    (an empty stretch), also where rounding puts the point at the very end."""
    point = torch.tensor([u], dtype=cdf.dtype) * cdf[-1]
    last = torch.searchsorted(cdf, cdf[-1:])  # the last index with any probability
    return int(torch.minimum(torch.searchsorted(cdf, point, right=True), last))
