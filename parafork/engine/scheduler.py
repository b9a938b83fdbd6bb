"""Continuous batching over the threads of all requests.

Every step feeds, in one forward, the pending tokens of every live thread of the running
requests (oldest first), then admits waiting requests while the step's tokens and the KV
pool allow (a long prompt is prefilled in chunks). When the pool cannot hold the next
step, the newest running request is preempted: its blocks are freed and its live threads
are recomputed from their tokens when it runs again, one thread at a time so that forks
find their shared prefixes in the prefix cache. Nothing is dropped.

Admission reserves growth so that preemption stays rare: a waiting request is admitted only
if its prompt's blocks, one free block for every thread already in the step (each may open
a new block soon) and the future KV of every running request and of itself fit the free
blocks. A request's future KV is `growth_ratio` x its budget left (`max_tokens` over all its
threads, so children are included), in blocks, scaled by `EngineConfig.admission_reserve`
(0: no growth reserved). The ratio adapts as SGLang's does: every preemption raises it (the
estimate was too low), every step without one lowers it a little, within [GROWTH_MIN, 1].
An idle pool admits whatever fits. Without a reserve, a preempted request came back as soon
as its blocks were free, left no room to grow, and was preempted again: 64 APAR clients on
256 blocks thrashed (198 preemptions for 64 requests, throughput below serial decoding's);
with only the one-block-a-thread headroom, 61 (AR) and 46 (APAR) preemptions for 64
requests remained (results/load, 902fb93).
Waiting requests are admitted in arrival order and a preempted one keeps its arrival, so
nothing newer is admitted while a preempted tree waits.

Load-adaptive forking: when the pool cannot hold a request's threads for the next step, the
request first runs **serialized** for that step (its newest thread alone, as in `serial`
mode: the same text, since a thread sees only its ancestors) before anything is preempted;
a serialized request opens at most one block a step and keeps all its verified work.
`Request.num_serialized_steps` counts those steps. Only when even that does not fit is the
youngest request preempted. When rows rather than blocks are dear, forks are deferred by a
step so that a child does not feed its parent's `[Fork]` again (engine.py, "Deferred forks");
a deferred child is not scheduled until it has its KV.

A thread holds a runner sequence id exactly while it holds KV: it takes one when it is
first scheduled (or born by a fork) and gives it back when its blocks are freed (finished,
aborted or preempted). Freed ids wait in `take_released()` for the engine to tell the runner.

Joins (engine/thread.py): in a request that may join, a finished thread keeps its KV while
a join may still read it (`Request.needs_kv`); `release_unneeded` frees the rest. A thread
waiting at its `[Join]` feeds nothing until the engine has put the join in place. After a
preemption, the finished threads a join needs are recomputed like live ones (their last
token is never fed), and the joins are made again before the tokens after them are fed.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .budget import waits_for_descendants
from .runner import BlockCopy
from .thread import FinishReason, Request, Thread


@dataclass
class ScheduledBatch:
    threads: list[Thread] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each thread feeds this step (draft not included)
    tokens_left: int = 0  # of the step's max_batch_tokens, after every thread's pending tokens

    def __len__(self) -> int:
        return len(self.threads)


class SequenceIds:
    """Sequence ids for the runner: the smallest free id first, so ids stay dense (a
    sequence-addressed backend has a hard cap, e.g. llama.cpp's `n_seq_max`)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._free: list[int] = []
        self._next = 0
        self.live: set[int] = set()

    @property
    def room(self) -> int | None:
        """Ids that can still be handed out (None: no limit)."""
        return None if self.limit is None else self.limit - len(self.live)

    def take(self) -> int:
        if self.room == 0:
            raise RuntimeError("no free sequence id")
        if self._free:
            seq_id = heapq.heappop(self._free)
        else:
            seq_id, self._next = self._next, self._next + 1
        self.live.add(seq_id)
        return seq_id

    def give_back(self, seq_id: int) -> None:
        self.live.remove(seq_id)
        heapq.heappush(self._free, seq_id)


GROWTH_START = 0.5  # share of a request's budget left expected to become KV, at the start
GROWTH_MIN = 0.2  # the share never falls below this
GROWTH_RAISE = 0.2  # added after each preemption (up to 1)
GROWTH_DECAY = 0.002  # taken off at each step without one


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_tokens: int, max_live_sequences: int | None = None,
                 admission_reserve: float = 1.0) -> None:
        self.block_manager = block_manager
        self.admission_reserve = admission_reserve  # scales future_blocks; 0: admission reserves no growth
        self.max_batch_tokens = max_batch_tokens
        self.seq_ids = SequenceIds(max_live_sequences)
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        self._released: list[int] = []
        self.num_preemptions = 0  # over all requests, since the start
        self.num_serialized_steps = 0  # request-steps run serialized for lack of KV, since the start
        self.growth_ratio = GROWTH_START

    def future_blocks(self, request: Request) -> int:
        """The KV blocks the request is expected to add before it ends (admission's reserve)."""
        tokens = int(self.admission_reserve * self.growth_ratio * max(0, request.tokens_left))
        return -(-tokens // self.block_manager.block_size)

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=lambda r: r.arrival)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free(self, thread: Thread) -> None:
        """Frees the thread's KV blocks and its sequence id."""
        self.block_manager.free(thread)
        if thread.seq_id is not None:
            self.seq_ids.give_back(thread.seq_id)
            self._released.append(thread.seq_id)
            thread.seq_id = None

    def release_unneeded(self, request: Request) -> None:
        """Frees the KV of the request's finished threads that nothing can attend to any more."""
        needed = set(request.kv_threads)
        for thread in request.threads:
            if thread.finished and thread not in needed and (thread.block_table or thread.seq_id is not None):
                self.free(thread)

    def take_released(self) -> list[int]:
        """Sequence ids freed since the last call (the runner must be told)."""
        released, self._released = self._released, []
        return released

    def fork(self, parent: Thread, child: Thread) -> tuple[int, BlockCopy | None]:
        """The child's sequence id and the tail-block copy; it shares the parent's KV."""
        child.seq_id = self.seq_ids.take()
        return child.seq_id, self.block_manager.fork(parent, child)

    def remove(self, request: Request) -> None:
        """Takes a finished or aborted request out and frees every block it holds."""
        for thread in request.threads:
            self.free(thread)
        for queue in (self.waiting, self.running):
            if request in queue:
                queue.remove(request)

    def _preempt(self, request: Request) -> None:
        for thread in request.threads:
            thread.recompute_until = max(thread.recompute_until, thread.num_cached)
            thread.fork_deferred = False  # recomputed like every thread (its parent's KV is gone)
            self.free(thread)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.growth_ratio = min(1.0, self.growth_ratio + GROWTH_RAISE)
        self.running.remove(request)
        self.add(request)

    def _schedule_request(self, request: Request, batch: ScheduledBatch, tokens_left: int, reserve: int = 0,
                          serialized: bool = False) -> int | None:
        """Adds the request's live threads to the batch (`serialized`: its newest one only);
        returns the step's tokens left, or None when the pool cannot hold them with `reserve`
        blocks to spare (the batch is left without them)."""
        start, new_ids, room = len(batch), 0, self.seq_ids.room
        held: list[int] = []  # blocks each thread added to the batch held before this call
        # Parents wait for children near the end (budget.py), joining threads for their group.
        threads = self._schedulable(request)
        if serialized or request.params.mode == "serial":
            threads = threads[-1:]  # the newest thread runs alone: depth first, in reading order
        for thread in threads:
            if thread.num_cached == 0:
                if any(len(t.window) > 2 for t in threads if t.thread_id < thread.thread_id):
                    break  # recompute one thread at a time, so later ones find its blocks in the cache
                if request.params.speculative != "eagle":
                    # (A head's drafts need the target's hidden states of every position, which a
                    # prefix-cache hit never computes: eagle.py.)
                    self.block_manager.match_prefix(thread)
            n = min(len(thread.window), tokens_left)
            if n == 0:
                continue
            new_ids += thread.seq_id is None
            no_id = room is not None and new_ids > room
            if no_id or self.block_manager.blocks_needed(thread, thread.num_cached + n) > self.block_manager.num_free - reserve:
                for added, had in zip(batch.threads[start:], held):  # give back what this call took
                    self.block_manager.truncate(added, had * self.block_manager.block_size)
                del batch.threads[start:], batch.num_tokens[start:]
                return None
            held.append(len(thread.block_table))
            self.block_manager.allocate(thread, thread.num_cached + n)
            batch.threads.append(thread)
            batch.num_tokens.append(n)
            tokens_left -= n
        for thread in batch.threads[start:]:  # ids only once the request's threads all fit
            if thread.seq_id is None:
                thread.seq_id = self.seq_ids.take()
        return tokens_left

    @staticmethod
    def _schedulable(request: Request) -> list[Thread]:
        """Threads with tokens to feed, but parents waiting for their children near the end of
        the budget (one whose deferred child waits for its [Fork] feeds that) and children whose
        fork is deferred."""
        return [t for t in request.kv_threads if t.window and not t.fork_deferred and (
            t.finished or not waits_for_descendants(t) or any(c.fork_deferred for c in t.children.values()))]

    def schedule(self) -> tuple[ScheduledBatch, list[Request]]:
        """The next step's batch, and requests that can never fit the pool (taken out of the
        queues with their finish reason and error set; the engine finishes them)."""
        batch = ScheduledBatch()
        unservable: list[Request] = []
        tokens_left = self.max_batch_tokens
        preemptions = self.num_preemptions
        i = 0
        while i < len(self.running):
            request = self.running[i]
            left = self._schedule_request(request, batch, tokens_left)
            if left is None and request.params.mode != "serial" and len(self._schedulable(request)) > 1:
                left = self._schedule_request(request, batch, tokens_left, serialized=True)
                if left is not None:
                    request.num_serialized_steps += 1
                    self.num_serialized_steps += 1
            if left is not None:
                tokens_left, i = left, i + 1
                continue
            # Out of blocks even serialized: preempt the newest request and retry (possibly this one).
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                unservable.append(request)
                self.running.remove(request)
                self._fail(request)
            else:
                self._preempt(victim)
        if self.num_preemptions == preemptions:
            self.growth_ratio = max(GROWTH_MIN, self.growth_ratio - GROWTH_DECAY)
        growth = sum(self.future_blocks(r) for r in self.running)
        while self.waiting and tokens_left > 0:
            request = self.waiting[0]
            # An idle pool admits whatever fits: a reserve alone never makes a request unservable.
            reserve = len(batch) + growth + self.future_blocks(request) if self.running else 0
            left = self._schedule_request(request, batch, tokens_left, reserve=reserve)
            if left is None:
                for thread in request.threads:  # a waiting request holds no blocks, matched ones included
                    self.free(thread)
                if not self.running and not batch.threads:
                    self.waiting.pop(0)
                    unservable.append(request)
                    self._fail(request)
                    continue
                break
            self.waiting.pop(0)
            bisect.insort(self.running, request, key=lambda r: r.arrival)
            growth += self.future_blocks(request)
            tokens_left = left
        batch.tokens_left = tokens_left
        return batch, unservable

    def add_draft(self, batch: ScheduledBatch, index: int, draft: list[int]) -> list[int]:
        """Gives thread `index` of the batch the part of `draft` that the step's tokens left
        and the free KV blocks allow (drafts come after every thread's and request's
        pending tokens and never cause a preemption); returns that part."""
        thread = batch.threads[index]
        fed = thread.num_cached + batch.num_tokens[index]
        n = min(len(draft), batch.tokens_left)
        while n and self.block_manager.blocks_needed(thread, fed + n) > self.block_manager.num_free:
            n -= 1
        if n:
            self.block_manager.allocate(thread, fed + n)
            batch.tokens_left -= n
        return draft[:n]

    def _fail(self, request: Request) -> None:
        request.finish_reason = FinishReason.LENGTH if request.num_generated else FinishReason.ERROR
        request.error = f"the request needs more KV blocks than the whole pool has ({self.block_manager.num_blocks})"
