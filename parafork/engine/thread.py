"""Threads and requests: the tree that APAR decoding grows.

A request starts with one root thread holding the prompt. When a thread samples `[Fork]`
it keeps going, and a child thread is born whose context is the parent's tokens up to
and including that `[Fork]`, followed by a forced `[Child]`. Token `i` of any thread
always sits at position `i`, so a child's `[Child]` shares its position with the
parent's next token, and the child's context is exactly what a plain AR run over
(ancestors + `[Child]` + child tokens) would see.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..sampling import SamplingParams
from .speculation import DraftStats


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence token
    LENGTH = "length"  # max_tokens over all threads, or the model's context length
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # could not be served (e.g. larger than the whole KV pool)


_thread_ids = itertools.count()


@dataclass(eq=False)
class Thread:
    request: Request
    token_ids: list[int]  # the whole context: inherited prefix + own tokens
    own_start: int  # index of this thread's first own token ([Child] for a child)
    depth: int = 0
    parent: Thread | None = None
    thread_id: int = field(default_factory=lambda: next(_thread_ids))  # birth order, never reused
    seq_id: int | None = None  # the runner's handle while the thread holds KV (reused after release)
    num_cached: int = 0  # leading tokens whose K/V sit in the cache
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks computed
    children: dict[int, Thread] = field(default_factory=dict)  # own index of a [Fork] -> child
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # per thread, so samples do not depend on batching
    # Per own token when the request asks for logprobs: (log-probability, top alternatives), None if forced.
    logprobs: list | None = None
    draft: list[int] = field(default_factory=list)  # this step's draft tokens, fed after `pending` (speculation.py)
    draft_stats: DraftStats = field(default_factory=DraftStats)

    @property
    def own_tokens(self) -> list[int]:
        return self.token_ids[self.own_start :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pending(self) -> list[int]:
        """Tokens to feed to the model before the next sample."""
        return self.token_ids[self.num_cached :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params.with_defaults()  # what is still unset (None) is off: penalties
        self.arrival = arrival  # order of arrival, for FCFS scheduling and LIFO preemption
        self.threads: list[Thread] = []
        self.root = self._new_thread(list(prompt_token_ids), len(prompt_token_ids), depth=0, parent=None)
        self.num_generated = 0  # tokens appended over all threads, control tokens included
        self.num_steps = 0  # forward passes this request took part in
        self.num_preemptions = 0
        self.held_blocks: dict[int, int] = {}  # KV block -> how many of this request's threads hold it
        self.peak_blocks = 0  # most distinct KV blocks held at once (after a step)
        self.attention_work = 0  # sum over fed tokens of the keys each one attends to
        self.num_draft_tokens = 0  # draft tokens fed (speculation.py)
        self.num_accepted_tokens = 0  # of which the model's own samples agreed with
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.streaming = True  # outputs carry text at every step (else only when finished)

    def _new_thread(self, token_ids: list[int], own_start: int, depth: int, parent: Thread | None) -> Thread:
        thread = Thread(self, token_ids, own_start, depth=depth, parent=parent)
        if self.params.logprobs is not None:
            thread.logprobs = [None] * (len(token_ids) - own_start)  # a child's forced [Child]
        if self.params.seed is not None:
            # Seeded by (seed, birth order in the request): other requests never shift the draws.
            thread.generator = torch.Generator().manual_seed(self.params.seed * 100_003 + len(self.threads))
        self.threads.append(thread)
        return thread

    def fork(self, parent: Thread, child_token: int) -> Thread:
        """Starts a child at the parent's last token, which must be the `[Fork]` just sampled."""
        fork_index = len(parent.token_ids) - 1
        child = self._new_thread(parent.token_ids + [child_token], fork_index + 1, parent.depth + 1, parent)
        parent.children[fork_index - parent.own_start] = child
        return child

    @property
    def live_threads(self) -> list[Thread]:
        return [t for t in self.threads if not t.finished]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

