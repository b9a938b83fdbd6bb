"""Ref-counted blocks: forks share full blocks, copy at most the tail, and nothing leaks."""
from hypothesis import given, settings
from hypothesis import strategies as st

from parafork.engine.block_manager import BlockManager
from parafork.engine.runner import BlockCopy
from parafork.engine.thread import Request
from parafork.sampling import SamplingParams

FORK, CHILD = 10_000, 10_001


def grow(bm: BlockManager, thread, n: int) -> None:
    """Feeds n tokens to a thread, as the engine does after a step."""
    thread.token_ids.extend([1] * n)
    bm.allocate(thread, len(thread.token_ids))
    thread.num_cached = len(thread.token_ids)


def fork_after_prompt(bm: BlockManager, prompt_len: int):
    """A root that fed its prompt and sampled [Fork], and the child born there."""
    req = Request("r", [1] * prompt_len, SamplingParams(), 0)
    bm.allocate(req.root, prompt_len)
    req.root.num_cached = prompt_len
    req.root.token_ids.append(FORK)
    free_before = bm.num_free
    child = req.fork(req.root, CHILD)
    copy = bm.fork(req.root, child)
    return req, child, copy, free_before


def test_fork_shares_full_blocks_and_copies_only_the_tail():
    bm = BlockManager(num_blocks=16, block_size=4)
    req, child, copy, free_before = fork_after_prompt(bm, 10)
    parent = req.root
    assert child.block_table[:2] == parent.block_table[:2]
    assert copy == BlockCopy(parent.block_table[2], child.block_table[2], 2)
    assert bm.num_free == free_before - 1  # exactly one block copied
    assert [bm.ref_counts[b] for b in parent.block_table] == [2, 2, 1]
    bm.check_invariants()


def test_fork_on_block_boundary_copies_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    req, child, copy, free_before = fork_after_prompt(bm, 8)
    assert copy is None
    assert bm.num_free == free_before
    assert child.block_table == req.root.block_table


def test_finished_thread_frees_its_own_blocks_at_once_but_not_shared_ones():
    bm = BlockManager(num_blocks=16, block_size=4)
    req, child, _, _ = fork_after_prompt(bm, 8)
    grow(bm, child, 9)  # child's own blocks
    own = [b for b in child.block_table if b not in req.root.block_table]
    assert own
    bm.free(child)
    assert all(bm.ref_counts[b] == 0 for b in own)
    assert all(bm.ref_counts[b] == 1 for b in req.root.block_table)
    bm.free(req.root)
    assert bm.num_free == 16
    bm.check_invariants()


def test_fork_with_an_empty_pool_recomputes_the_tail_instead_of_failing():
    bm = BlockManager(num_blocks=3, block_size=4)
    req, child, copy, _ = fork_after_prompt(bm, 10)
    assert copy is None
    assert child.num_cached == 8 and child.pending == [1, 1, FORK, CHILD]


ops = st.lists(
    st.tuples(st.sampled_from(["grow", "fork", "finish", "abort", "new"]), st.integers(0, 1000), st.integers(1, 9)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.integers(1, 6))
def test_random_fork_finish_abort_sequences_keep_the_pool_consistent(ops, block_size):
    num_blocks = 64
    bm = BlockManager(num_blocks=num_blocks, block_size=block_size)
    requests: list[Request] = []

    def live():
        return [t for r in requests for t in r.live_threads]

    for op, pick, n in ops:
        if op == "new" or not requests:
            r = Request(f"r{len(requests)}", [1] * n, SamplingParams(), len(requests))
            if bm.blocks_needed(r.root, n) <= bm.num_free:
                bm.allocate(r.root, n)
                r.root.num_cached = n
                requests.append(r)
            continue
        threads = live()
        if not threads:
            continue
        t = threads[pick % len(threads)]
        if op == "grow" and bm.blocks_needed(t, len(t.token_ids) + n) <= bm.num_free:
            grow(bm, t, n)
        elif op == "fork" and not t.pending:  # the engine forks right after a sample
            t.token_ids.append(FORK)
            free_before = bm.num_free
            child = t.request.fork(t, CHILD)
            bm.fork(t, child)
            assert free_before - bm.num_free <= 1, "a fork copies at most one block"
            assert child.num_cached <= t.num_cached
            assert child.pending[-2:] == [FORK, CHILD]
        elif op == "finish":
            t.finish_reason = "stop"
            bm.free(t)
            assert t.block_table == []
        elif op == "abort":
            for thread in t.request.threads:
                thread.finish_reason = thread.finish_reason or "abort"
                bm.free(thread)
        bm.check_invariants()
        # Every held block is referenced exactly as often as thread tables name it.
        counts: dict[int, int] = {}
        for r in requests:
            for thread in r.threads:
                for b in thread.block_table:
                    counts[b] = counts.get(b, 0) + 1
        assert all(bm.ref_counts[b] == c for b, c in counts.items())
        assert bm.num_free == num_blocks - len(counts)
    for r in requests:
        for thread in r.threads:
            bm.free(thread)
    assert bm.num_free == num_blocks
    bm.check_invariants()


def test_prefix_cache_finds_computed_full_blocks_until_they_are_reused():
    bm = BlockManager(num_blocks=6, block_size=4)
    first = Request("a", list(range(10)), SamplingParams(), 0).root
    bm.match_prefix(first)
    assert first.num_cached == 0  # nothing computed yet
    bm.allocate(first, 10)
    first.num_cached = 10
    bm.register(first)
    assert len(first.block_keys) == 2  # the partial third block is not cached
    blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_free == 6
    same = Request("b", list(range(10)) + [99], SamplingParams(), 1).root
    bm.match_prefix(same)
    assert same.block_table == blocks[:2] and same.num_cached == 8
    differs = Request("c", [0, 1, 2, 3, 4, 5, 6, 77, 8, 9], SamplingParams(), 2).root
    bm.match_prefix(differs)
    assert differs.block_table == blocks[:1] and bm.ref_counts[blocks[0]] == 2
    exact = Request("d", list(range(8)), SamplingParams(), 3).root
    bm.match_prefix(exact)
    assert exact.num_cached == 4  # one token is always left to compute
    bm.check_invariants()
    for t in (same, differs, exact):
        bm.free(t)
    hog = Request("e", [50] * 24, SamplingParams(), 4).root
    bm.allocate(hog, 24)  # takes every block: cached contents are overwritten
    bm.free(hog)
    again = Request("f", list(range(10)), SamplingParams(), 5).root
    bm.match_prefix(again)
    assert again.num_cached == 0 and not bm.cached
    bm.check_invariants()
