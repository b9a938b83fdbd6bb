"""The APAR decoding rules and the sampler: one token per thread from its logits row.

Kept apart from `SamplingParams` (the public request parameters) so that the policy
that walks engine threads lives inside the engine.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..sampling import FORKING_MODES
from ..tokens import ControlTokens
from .thread import Thread


def apply_apar_rules(
    logits: torch.Tensor, threads: Sequence[Thread], control: ControlTokens, fork_room: int | None = None
) -> None:
    """The decoding rules of APAR, in place on `[B, V]` logits.

    `[Child]` is never sampled. `[Fork]` is banned in AR mode, right after `[Fork]`/`[Child]`,
    at the depth cap (a thread of depth d may fork only if d + 1 < max_depth), when the
    request already has max_threads threads, and for all but the first `fork_room` threads
    that may fork (the runner's free sequence ids; None: no limit). Raw mode leaves
    `[Fork]` to the caller. Then each request's `logit_bias` is added.
    """
    logits[:, control.child_id] = float("-inf")
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


def _fork_banned(thread: Thread, control: ControlTokens) -> bool:
    params = thread.request.params
    if params.mode not in FORKING_MODES:
        return params.mode == "ar"
    return (
        thread.last_token in (control.fork_id, control.child_id)
        or thread.depth + 1 >= params.max_depth
        or len(thread.request.threads) >= params.max_threads
    )


def sample(logits: torch.Tensor, threads: Sequence[Thread]) -> list[int]:
    """One token per row: argmax for greedy requests, temperature + top-p otherwise."""
    chosen = logits.argmax(dim=-1).tolist()
    for i, thread in enumerate(threads):
        params = thread.request.params
        if params.greedy:
            continue
        probs = torch.softmax(logits[i] / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        chosen[i] = int(torch.multinomial(probs, 1, generator=thread.generator))
    return chosen
