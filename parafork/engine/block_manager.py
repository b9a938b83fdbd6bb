"""Ref-counted KV blocks: allocation, zero-copy forking, early release, prefix caching.

Threads of one request share their ancestors' blocks. A fork adds a reference to every
full block of the parent and copies only the partial tail block (the parent and the
child write different tokens into the rest of it). A finished thread drops its
references at once, so its own blocks return to the pool while shared ones stay.

Prefix cache: token i of every thread sits at position i, so a full block's K/V depends
only on the tokens up to its end. Each computed full block is keyed by a BLAKE2b-128 chain
over those tokens (the previous block's key, then this block's token ids), so a match
means equal prefixes with collision odds of 2^-128 (Python's 64-bit `hash()` of tuples,
used before, is not collision-safe for adversarial or merely very many prompts); a thread
that starts with no cache (a new request, or a thread recomputed
after preemption) takes every leading full block whose key is known instead of computing
it. Freed blocks keep their key until the pool hands them out again (least recently freed
first), so a prompt seen before, a driver's next round, or a preempted request's own
blocks are found again.

Joins (engine/thread.py): a thread that joins takes a reference to the blocks of every span
it attends to (`attach`), so a joined child's blocks stay while anything attends to them,
after the child itself is freed. KV from a thread's first join on depends on those spans,
not only on its tokens: such blocks are never keyed nor matched in the prefix cache.
"""
from __future__ import annotations

from array import array
from collections import deque
from hashlib import blake2b

from .runner import BlockCopy, KVSpan
from .thread import Join, Thread


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, paged: bool = True) -> None:
        """`paged`: the runner addresses KV by these block tables (else it only bounds what a
        sequence-addressed runner holds: llama.cpp shares a fork's tail cells, copies nothing)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.prefix_caching = prefix_caching
        self.paged = paged
        self.cached: dict[bytes, int] = {}  # prefix key -> block holding that prefix's last block
        self.block_key: dict[int, bytes] = {}  # block -> its key in `cached`
        self.hit_tokens = 0  # tokens taken from the prefix cache instead of computed

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, thread: Thread, num_tokens: int) -> int:
        """New blocks `thread` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(thread.block_table))

    def _take(self, thread: Thread) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        key = self.block_key.pop(block, None)
        if key is not None:
            del self.cached[key]  # its content is about to be overwritten
        self._hold(thread, block)
        return block

    @staticmethod
    def _hold(thread: Thread, block: int) -> None:
        """Counts the block for the thread's request (its distinct blocks give its KV footprint)."""
        held = thread.request.held_blocks
        held[block] = held.get(block, 0) + 1

    def _key(self, thread: Thread, index: int) -> bytes:
        h = blake2b(thread.block_keys[index - 1] if index else b"", digest_size=16)
        h.update(array("q", thread.token_ids[index * self.block_size : (index + 1) * self.block_size]).tobytes())
        return h.digest()

    @staticmethod
    def _keyable(thread: Thread) -> int:
        """Tokens of the thread whose KV depends on its tokens alone (all of them before its first join)."""
        return thread.joins[0].index if thread.joins else len(thread.token_ids)

    def register(self, thread: Thread) -> None:
        """Records the keys of the thread's full blocks computed so far (after a forward)."""
        if not self.prefix_caching:
            return
        for index in range(len(thread.block_keys), min(thread.num_cached, self._keyable(thread)) // self.block_size):
            key = self._key(thread, index)
            thread.block_keys.append(key)
            block = thread.block_table[index]
            if key not in self.cached and block not in self.block_key:
                self.cached[key] = block
                self.block_key[block] = key

    def match_prefix(self, thread: Thread) -> None:
        """Gives a thread with no cache every leading full block of its context that is in
        the prefix cache (at least one token is always left to feed, before any join)."""
        assert not thread.block_table and thread.num_cached == 0
        if not self.prefix_caching:
            return
        # At least one token of the thread's first window is fed (a thread holds a sequence id
        # only once scheduled): before its end token if finished, before its first join.
        for index in range((thread.feed_end - 1) // self.block_size):
            key = self._key(thread, index)
            block = self.cached.get(key)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                self.free_blocks.remove(block)
            self.ref_counts[block] += 1
            self._hold(thread, block)
            thread.block_table.append(block)
            thread.block_keys.append(key)
        thread.num_cached = len(thread.block_table) * self.block_size
        self.hit_tokens += thread.num_cached

    def allocate(self, thread: Thread, num_tokens: int) -> None:
        """Grows `thread`'s block table to hold `num_tokens` tokens."""
        need = self.blocks_needed(thread, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"KV pool exhausted: need {need} blocks, {self.num_free} free")
        thread.block_table.extend(self._take(thread) for _ in range(need))

    def fork(self, parent: Thread, child: Thread) -> BlockCopy | None:
        """Gives `child` the parent's cached context: shared full blocks, a copied tail.

        Returns the tail copy the runner must make, or None when the parent's cached
        tokens end on a block boundary (nothing to copy).
        """
        cached = parent.num_cached
        full, tail = divmod(cached, self.block_size)
        shared = parent.block_table[:full]
        for block in shared:
            self.ref_counts[block] += 1
            self._hold(child, block)
        child.block_table = list(shared)
        child.block_keys = parent.block_keys[:full]
        child.num_cached = cached
        if tail == 0:
            self._inherit_spans(parent, child)
            return None
        if self.num_free == 0:
            # No room for the copy: the child recomputes its tail slots when it runs (paged), or
            # counts them in the block it takes when it runs (the runner shares the cells).
            if self.paged:
                child.num_cached = full * self.block_size
            self._inherit_spans(parent, child)
            return None
        dst = self._take(child)
        child.block_table.append(dst)
        self._inherit_spans(parent, child)
        return BlockCopy(parent.block_table[full], dst, tail)

    def _inherit_spans(self, parent: Thread, child: Thread) -> None:
        """The child attends to the parent's joined spans of the joins before its cached tokens
        (all of them, unless the fork lost its tail: then the later ones are made again)."""
        n = 0
        while n < parent.established and parent.joins[n].index <= child.num_cached:
            n += 1
        child.established = n
        self.attach(child, [(j, s) for j, s in parent.spans if j in parent.joins[:n]])

    def span_blocks(self, span: KVSpan) -> list[int]:
        return list(span.block_table[span.start // self.block_size : -(-span.end // self.block_size)])

    def attach(self, thread: Thread, spans: list[tuple[Join, KVSpan]]) -> None:
        """The thread attends to `spans` from now on and holds their blocks."""
        for _, span in spans:
            for block in self.span_blocks(span):
                assert self.ref_counts[block] > 0, "a span's block is free"
                self.ref_counts[block] += 1
                self._hold(thread, block)
        thread.spans.extend(spans)

    def truncate(self, thread: Thread, num_tokens: int) -> None:
        """Cuts the thread's block table to the blocks its first `num_tokens` tokens need (after a
        rejected draft, or a schedule that did not fit); the blocks cut were taken for those
        tokens, so only this thread held them."""
        keep = -(-num_tokens // self.block_size)
        assert all(self.ref_counts[b] == 1 for b in thread.block_table[keep:]), "a draft's block is shared"
        self._drop(thread, thread.block_table[keep:])
        del thread.block_table[keep:]

    def free(self, thread: Thread) -> None:
        """Drops the thread's references (its blocks and its spans'); blocks nobody else holds
        return to the pool. Its joins are no longer in place."""
        self._drop(thread, thread.block_table)
        for _, span in thread.spans:
            self._drop(thread, self.span_blocks(span))
        thread.spans = []
        thread.established = 0
        thread.block_table = []
        thread.block_keys = []
        thread.num_cached = 0

    def _drop(self, thread: Thread, blocks: list[int]) -> None:
        """Drops one reference of `thread` to each block; unreferenced blocks return to the pool."""
        held = thread.request.held_blocks
        for block in blocks:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
            held[block] -= 1
            if not held[block]:
                del held[block]

    def check_invariants(self) -> None:
        """Every block is either free with no reference or held with a positive count."""
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is in the free pool twice"
        for block, count in enumerate(self.ref_counts):
            assert (count == 0) == (block in free), f"block {block}: refs {count}, free {block in free}"
        assert all(self.cached[key] == block for block, key in self.block_key.items()), "prefix cache out of sync"
        assert len(self.cached) == len(self.block_key), "prefix cache out of sync"
