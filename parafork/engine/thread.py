"""Threads and requests: the tree that APAR decoding grows.

A request starts with one root thread holding the prompt. When a thread samples `[Fork]`
it keeps going, and a child thread is born whose context is the parent's tokens up to
and including that `[Fork]`, followed by a forced `[Child]`. Before any join, token `i` of
a thread sits at position `i`, so a child's `[Child]` shares its position with the
parent's next token, and the child's context is exactly what a plain AR run over
(ancestors + `[Child]` + child tokens) would see.

**Joins.** A thread that samples `[Join]` (at token index j) waits until every child it
forked since its previous join has finished. From `[Join]` on, its tokens also attend to
each such child's *joined span*: the child's own tokens with KV (`[Child]` and its body;
its end token is never fed) and, recursively, the spans the child itself joined. A child's
copy of its parent's tokens is not attended twice, and a grandchild its parent never
joined is not attended at all. Positions after a join continue from the last position of
anything the join attends to: `[Join]` sits at max(j + offset before, last position of
every joined span + 1), and the tokens after it follow (Multiverse's rule, the one that
llama.cpp's unified cache accepts as it is: it requires a sequence's next position to be
its largest one + 1; README, "Joins"). A `Join` is kept by its thread and inherited by the
children it forks later, which see the same KV. Nothing is recomputed at a join: the
children's KV is attended where it lies.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..sampling import SamplingParams
from .runner import KVSpan


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence token
    LENGTH = "length"  # max_tokens over all threads, or the model's context length
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # could not be served (e.g. larger than the whole KV pool)


_thread_ids = itertools.count()



# A thread's record of its drafts (engine/speculation.py), kept with the thread it describes:
DECAY = 0.8  # weight of a thread's past verifications against the newest


@dataclass
class DraftStats:
    """A thread's recent acceptance (decayed counts)."""

    accepted: float = 0.0
    rejected: float = 0.0

    @property
    def acceptance(self) -> float:
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def update(self, proposed: int, accepted: int) -> None:
        self.accepted = self.accepted * DECAY + accepted
        self.rejected = self.rejected * DECAY + (accepted < proposed)

    def idle(self) -> None:
        self.accepted *= DECAY
        self.rejected *= DECAY


@dataclass(frozen=True)
class TreeShape:
    """What bounds a request's APAR speed. Tokens count every token a thread sampled, control
    tokens included (a child's forced `[Child]` too); the spine is the root's own tokens, which
    no fork shortens: a forked answer takes at least that many decode steps, plus what joins wait."""

    joins: int  # `[Join]`s sampled, over all threads
    depth: int  # levels of threads: 1 = the root alone, 2 = root and children, ...
    spine_tokens: int  # tokens the root wrote
    longest_branch_tokens: int  # most tokens one non-root thread wrote (0: no fork)


@dataclass(eq=False)
class Join:
    """A `[Join]` at token index `index` of `owner`: from there on, `owner` (and every thread
    it forks later) attends to the joined spans of `children`."""

    owner: Thread
    index: int
    children: list[Thread]
    offset: int | None = None  # model position of token i >= index is i + offset; set once the children are done


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
    recompute_until: int = 0  # after a preemption: tokens fed again below this were computed before
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks computed
    children: dict[int, Thread] = field(default_factory=dict)  # own index of a [Fork] -> child
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # per thread, so samples do not depend on batching
    # Per own token when the request asks for logprobs: (log-probability, top alternatives), None if forced.
    logprobs: list | None = None
    draft: list[int] = field(default_factory=list)  # this step's draft tokens, fed after `pending` (speculation.py)
    draft_stats: DraftStats = field(default_factory=DraftStats)
    draft_by_head: bool = False  # this step's draft came from a trained head (eagle.py), not lookup
    # Where the head drew the draft's tokens (a sampled request): each one's distribution over
    # the draft vocabulary, for the speculative-sampling rule (sampler.settle_offer); else empty.
    draft_dists: list = field(default_factory=list)
    # A head's siblings fed beside the draft this step (engine.py): (depth j, token), another
    # token for draft position j, fed after the draft and attending to the draft before j only.
    draft_siblings: list[tuple[int, int]] = field(default_factory=list)
    # Joins this thread sees, in index order: its ancestors' (inherited at its fork) and its own.
    joins: list[Join] = field(default_factory=list)
    established: int = 0  # joins[:established] have their KV in place for this thread (spans / runner cells)
    # KV of other threads attended (its blocks held by this thread), with the join it came through.
    spans: list[tuple[Join, KVSpan]] = field(default_factory=list)
    # A child whose fork was deferred (engine.py): it holds no KV and no sequence id and is not
    # scheduled until its parent has fed the [Fork]; then it gets the parent's KV through it.
    fork_deferred: bool = False

    def position(self, index: int) -> int:
        """Model position of token `index` (its index, plus the offset of the last join before it)."""
        offset = 0
        for join in self.joins:
            if join.index > index or join.offset is None:
                break
            offset = join.offset
        return index + offset

    @property
    def last_own_join(self) -> int:
        """Token index of this thread's own latest `[Join]` (-1: none)."""
        return max((j.index for j in self.joins if j.owner is self), default=-1)

    def unjoined_children(self) -> list[Thread]:
        """Children forked since this thread's latest own join, in birth order."""
        last = self.last_own_join
        return [c for i, c in sorted(self.children.items()) if self.own_start + i > last]

    @property
    def feed_end(self) -> int:
        """One past the last token this thread can feed now: a finished thread's last token is
        never fed; a slice never crosses a join (KV before and after it sees different keys),
        and stops at a join whose KV is not in place yet."""
        end = len(self.token_ids) - (1 if self.finished else 0)
        for k, join in enumerate(self.joins):
            if join.index > self.num_cached or k >= self.established:
                assert join.index >= self.num_cached, "KV cached past a join that is not in place"
                return min(end, join.index)
        return end

    @property
    def window(self) -> list[int]:
        """The tokens to feed next (a prefix of `pending`)."""
        return self.token_ids[self.num_cached : self.feed_end]

    def deferred_child(self, end: int) -> Thread | None:
        """The child waiting on a deferred fork (engine.py) at this thread's token `end - 1`, if that is one."""
        child = self.children.get(end - 1 - self.own_start)
        return child if child is not None and child.fork_deferred else None

    @property
    def own_tokens(self) -> list[int]:
        return self.token_ids[self.own_start :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def draft_rows(self) -> int:
        """Rows this step's draft adds to the thread's slice: its tokens and their siblings."""
        return len(self.draft) + len(self.draft_siblings)

    @property
    def pending(self) -> list[int]:
        """Tokens to feed to the model before the next sample."""
        return self.token_ids[self.num_cached :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]


@dataclass
class RequestTimes:
    """When a request reached each stage, in `time.monotonic()` seconds (None: not yet): added to
    the engine, first in a step, its first generated token, finished. Set once each, by the engine
    after a step; what a server's latency histograms are computed from."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


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
        self.num_recomputed_tokens = 0  # fed again after a preemption (prefix-cache hits not counted)
        self.num_serialized_steps = 0  # steps its threads ran one at a time for lack of KV (scheduler.py)
        self.num_deferred_forks = 0  # forks whose child got its KV a step later, rows being dear (engine.py)
        self.held_blocks: dict[int, int] = {}  # KV block -> how many of this request's threads hold it
        self.peak_blocks = 0  # most distinct KV blocks held at once (after a step)
        self.attention_work = 0  # sum over fed tokens of the keys each one attends to
        self.num_draft_tokens = 0  # draft tokens fed (speculation.py)
        self.num_accepted_tokens = 0  # of which the model's own samples agreed with
        self.num_head_draft_tokens = 0  # of the drafts, those from a trained head (the rest: lookup)
        self.num_head_accepted_tokens = 0
        self.num_sibling_tokens = 0  # of the head's drafts, siblings fed beside its chains (engine.py)
        self.num_accepted_sibling_tokens = 0
        # Per draft position j (0: the first draft token): drafts that reached it, and were accepted there.
        self.drafted_at: list[int] = []
        self.accepted_at: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.streaming = True  # outputs carry text at every step (else only when finished)
        self.times = RequestTimes(time.monotonic())

    @property
    def tokens_left(self) -> int:
        """The request's budget: what is left of `max_tokens`, which covers all its threads."""
        return self.params.max_tokens - self.num_generated

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
        """Starts a child at the parent's last token, which must be the `[Fork]` just sampled.
        The child sees the parent's joins (the block manager decides which are in place)."""
        fork_index = len(parent.token_ids) - 1
        child = self._new_thread(parent.token_ids + [child_token], fork_index + 1, parent.depth + 1, parent)
        child.joins = list(parent.joins)
        parent.children[fork_index - parent.own_start] = child
        return child

    def join(self, thread: Thread) -> Join:
        """Records the `[Join]` the thread just sampled (its last token) over its unjoined children."""
        join = Join(thread, len(thread.token_ids) - 1, thread.unjoined_children())
        thread.joins.append(join)
        return join

    def needs_kv(self, thread: Thread, _memo: dict | None = None) -> bool:
        """Whether the thread's KV must exist: it is live; or it is a finished child whose
        parent may still join it (the request joins, the parent is live and has not joined
        it yet); or it belongs to a join that a thread needing KV has not put in place yet
        (a join being made, or remade after preemption)."""
        if not thread.finished:
            return True
        if not self.params.joins or thread.parent is None:
            return False
        memo = {} if _memo is None else _memo
        if thread in memo:
            return memo[thread]
        memo[thread] = False  # no cycles in a tree; guards the recursion
        parent = thread.parent
        joined = [j for j in parent.joins if j.owner is parent and thread in j.children]
        if not joined:
            result = not parent.finished
        else:
            join = joined[0]
            result = any(
                join in t.joins[t.established :] and self.needs_kv(t, memo) for t in self.threads if t.joins
            )
        memo[thread] = result
        return result

    def shape(self) -> TreeShape:
        """The tree the request grew so far (bench figures; read on the engine's thread)."""
        branches = [len(t.own_tokens) for t in self.threads if t.parent is not None]
        return TreeShape(
            joins=sum(1 for t in self.threads for j in t.joins if j.owner is t),
            depth=1 + max(t.depth for t in self.threads),
            spine_tokens=len(self.root.own_tokens),
            longest_branch_tokens=max(branches, default=0),
        )

    @property
    def kv_threads(self) -> list[Thread]:
        """Threads whose KV must exist: the live ones, and finished ones a join still needs."""
        if not self.params.joins:
            return self.live_threads
        memo: dict = {}
        return [t for t in self.threads if self.needs_kv(t, memo)]

    @property
    def live_threads(self) -> list[Thread]:
        return [t for t in self.threads if not t.finished]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

