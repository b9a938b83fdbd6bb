"""Continuous batching over the threads of all requests.

Every step feeds, in one forward, the pending tokens of every live thread of the running
requests (oldest first), then admits waiting requests while the token budget and the KV
pool allow (a long prompt is prefilled in chunks). When the pool cannot hold the next
step, the newest running request is preempted: its blocks are freed and its live threads
are recomputed from their tokens when it runs again, one thread at a time so that forks
find their shared prefixes in the prefix cache. Nothing is dropped.

Admission keeps headroom so that preemption stays rare: a waiting request is admitted only
if, after its blocks, one free block is left for every thread already in the step (each
may open a new block soon). Without it, a preempted request came back as soon as its blocks
were free, left no room to grow, and was preempted again: 64 APAR clients on 256 blocks
thrashed (198 preemptions for 64 requests, throughput below serial decoding's).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .thread import FinishReason, Request, Thread


@dataclass
class ScheduledBatch:
    threads: list[Thread] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens each thread feeds this step

    def __len__(self) -> int:
        return len(self.threads)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_tokens: int) -> None:
        self.blocks = block_manager
        self.max_batch_tokens = max_batch_tokens
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=lambda r: r.arrival)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, thread: Thread) -> None:
        self.blocks.free(thread)

    def remove(self, request: Request) -> None:
        """Takes a finished or aborted request out and frees every block it holds."""
        for thread in request.threads:
            self.blocks.free(thread)
        for queue in (self.waiting, self.running):
            if request in queue:
                queue.remove(request)

    def _preempt(self, request: Request) -> None:
        for thread in request.threads:
            self.blocks.free(thread)
        request.num_preemptions += 1
        self.running.remove(request)
        self.add(request)

    def _schedule_request(self, request: Request, batch: ScheduledBatch, budget: int, reserve: int = 0) -> int | None:
        """Adds the request's live threads to the batch; returns the budget left, or None
        when the pool cannot hold them with `reserve` blocks to spare (the batch is left
        without them)."""
        start = len(batch)
        threads = request.live_threads
        if request.params.mode == "serial":
            threads = threads[-1:]  # the newest thread runs alone: depth first, in reading order
        for thread in threads:
            if thread.num_cached == 0:
                if any(len(t.pending) > 2 for t in threads if t.thread_id < thread.thread_id):
                    break  # recompute one thread at a time, so later ones find its blocks in the cache
                self.blocks.match_prefix(thread)
            n = min(len(thread.pending), budget)
            if n == 0:
                continue
            if self.blocks.blocks_needed(thread, thread.num_cached + n) > self.blocks.num_free - reserve:
                del batch.threads[start:], batch.num_tokens[start:]
                return None
            self.blocks.allocate(thread, thread.num_cached + n)
            batch.threads.append(thread)
            batch.num_tokens.append(n)
            budget -= n
        return budget

    def schedule(self) -> tuple[ScheduledBatch, list[Request]]:
        """The next step's batch, and requests that can never fit the pool (to be failed)."""
        batch = ScheduledBatch()
        unservable: list[Request] = []
        budget = self.max_batch_tokens
        i = 0
        while i < len(self.running):
            request = self.running[i]
            left = self._schedule_request(request, batch, budget)
            if left is not None:
                budget, i = left, i + 1
                continue
            # Out of blocks: preempt the newest request and retry (possibly this one).
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                unservable.append(request)
                self.running.remove(request)
            else:
                self._preempt(victim)
        while self.waiting and budget > 0:
            request = self.waiting[0]
            left = self._schedule_request(request, batch, budget, reserve=len(batch))
            if left is None:
                for thread in request.threads:  # a waiting request holds no blocks, matched ones included
                    self.blocks.free(thread)
                if not self.running and not batch.threads:
                    self.waiting.pop(0)
                    unservable.append(request)
                    continue
                break
            self.waiting.pop(0)
            bisect.insort(self.running, request, key=lambda r: r.arrival)
            budget = left
        return batch, unservable


def finish_unservable(request: Request, num_blocks: int) -> None:
    request.finish_reason = FinishReason.LENGTH if request.num_generated else FinishReason.ERROR
    request.error = f"the request needs more KV blocks than the whole pool has ({num_blocks})"
