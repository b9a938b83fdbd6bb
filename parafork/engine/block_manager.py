"""Ref-counted KV blocks: allocation, zero-copy forking and early release.

Threads of one request share their ancestors' blocks. A fork adds a reference to every
full block of the parent and copies only the partial tail block (the parent and the
child write different tokens into the rest of it). A finished thread drops its
references at once, so its own blocks return to the pool while shared ones stay.
"""
from __future__ import annotations

from collections import deque

from .thread import Thread


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, thread: Thread, num_tokens: int) -> int:
        """New blocks `thread` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(thread.block_table))

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def allocate(self, thread: Thread, num_tokens: int) -> None:
        """Grows `thread`'s block table to hold `num_tokens` tokens."""
        need = self.blocks_needed(thread, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"KV pool exhausted: need {need} blocks, {self.num_free} free")
        thread.block_table.extend(self._take() for _ in range(need))

    def fork(self, parent: Thread, child: Thread) -> tuple[int, int, int] | None:
        """Gives `child` the parent's cached context: shared full blocks, a copied tail.

        Returns `(src, dst, num_slots)` of the tail copy the model runner must make, or
        None when the parent's cached tokens end on a block boundary (nothing to copy).
        """
        cached = parent.num_cached
        full, tail = divmod(cached, self.block_size)
        shared = parent.block_table[:full]
        for block in shared:
            self.ref_counts[block] += 1
        child.block_table = list(shared)
        child.num_cached = cached
        if tail == 0:
            return None
        if self.num_free == 0:
            # No room for the copy: the child recomputes its tail slots when it runs.
            child.num_cached = full * self.block_size
            return None
        dst = self._take()
        child.block_table.append(dst)
        return parent.block_table[full], dst, tail

    def share_prefix(self, thread: Thread, relatives: list[Thread]) -> None:
        """Points an empty thread at the longest run of full blocks of its context that a
        relative already holds (after a preemption, forks share their prefixes again)."""
        assert not thread.block_table
        bs = self.block_size
        best: tuple[int, Thread] | None = None
        limit = (len(thread.token_ids) - 1) // bs  # keep at least one token to feed
        for other in relatives:
            n = min(limit, other.num_cached // bs)
            k = 0
            while k < n and thread.token_ids[k * bs : (k + 1) * bs] == other.token_ids[k * bs : (k + 1) * bs]:
                k += 1
            if k and (best is None or k > best[0]):
                best = (k, other)
        if best is None:
            return
        k, other = best
        for block in other.block_table[:k]:
            self.ref_counts[block] += 1
        thread.block_table = list(other.block_table[:k])
        thread.num_cached = k * bs

    def free(self, thread: Thread) -> None:
        """Drops the thread's references; blocks nobody else holds return to the pool."""
        for block in thread.block_table:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        thread.block_table = []
        thread.num_cached = 0

    def check_invariants(self) -> None:
        """Every block is either free with no reference or held with a positive count."""
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is in the free pool twice"
        for block, count in enumerate(self.ref_counts):
            assert (count == 0) == (block in free), f"block {block}: refs {count}, free {block in free}"
