"""Admission and preemption policy of the scheduler, on the block manager alone (no model)."""
from parafork.engine.block_manager import BlockManager
from parafork.engine.scheduler import Scheduler
from parafork.engine.thread import Request
from parafork.sampling import SamplingParams

FORK, CHILD = 10_000, 10_001


def run_step(scheduler: Scheduler) -> list:
    """Schedules a step and marks what it fed as computed, as the engine does."""
    batch, unservable = scheduler.schedule()
    assert not unservable
    for thread, n in zip(batch.threads, batch.num_tokens):
        thread.num_cached += n
    return batch.threads


def running_with_two_threads(scheduler: Scheduler) -> Request:
    """A request that fed its 8-token prompt and forked: root and child each have tokens pending."""
    req = Request("a", [1] * 8, SamplingParams(), arrival=0)
    scheduler.add(req)
    run_step(scheduler)
    req.root.token_ids.append(FORK)
    scheduler.block_manager.fork(req.root, req.fork(req.root, CHILD))
    return req


def test_admission_leaves_a_free_block_for_every_thread_in_the_step():
    scheduler = Scheduler(BlockManager(num_blocks=12, block_size=4), max_batch_tokens=256)
    a = running_with_two_threads(scheduler)
    assert len(run_step(scheduler)) == 2  # root and child, the prompt's blocks shared
    free = scheduler.block_manager.num_free
    # b's prompt needs every free block but one: it would fit, but leave the two threads no room to grow.
    b = Request("b", [2] * 4 * (free - 1), SamplingParams(), arrival=1)
    scheduler.add(b)
    for thread in a.live_threads:
        thread.token_ids.append(3)
    run_step(scheduler)
    assert b in scheduler.waiting and b not in scheduler.running
    scheduler.remove(a)  # a ends: its blocks go back, and b gets in
    assert b in [t.request for t in run_step(scheduler)] and b in scheduler.running
    scheduler.remove(b)
    assert scheduler.block_manager.num_free == scheduler.block_manager.num_blocks


def test_admission_reserves_the_growth_of_running_and_new_requests():
    """b's prompt fits, but not beside what a and b are expected to add (growth_ratio x budget
    left): b waits; with no reserve (admission_reserve=0) it gets in at once."""
    for reserve, admitted in ((1.0, False), (0.0, True)):
        scheduler = Scheduler(BlockManager(num_blocks=20, block_size=4), max_batch_tokens=256, admission_reserve=reserve)
        a = Request("a", [1] * 8, SamplingParams(max_tokens=64), arrival=0)
        scheduler.add(a)
        run_step(scheduler)
        assert scheduler.future_blocks(a) == (-(-int(scheduler.growth_ratio * 64) // 4) if reserve else 0)
        b = Request("b", [2] * 16, SamplingParams(max_tokens=64), arrival=1)
        scheduler.add(b)
        a.root.token_ids.append(3)
        run_step(scheduler)
        assert (b in scheduler.running) == admitted


def test_an_idle_pool_admits_whatever_fits_whatever_the_reserve():
    scheduler = Scheduler(BlockManager(num_blocks=8, block_size=4), max_batch_tokens=256)
    big = Request("big", [1] * 16, SamplingParams(max_tokens=10_000), arrival=0)
    scheduler.add(big)
    assert scheduler.future_blocks(big) > 8
    batch, unservable = scheduler.schedule()
    assert not unservable and big in scheduler.running and batch.threads == [big.root]


def test_preemption_raises_the_growth_estimate_and_quiet_steps_lower_it():
    from parafork.engine.scheduler import GROWTH_MIN

    scheduler = Scheduler(BlockManager(num_blocks=40, block_size=4), max_batch_tokens=256)
    a = Request("a", [1] * 8, SamplingParams(max_tokens=64), arrival=0)
    scheduler.add(a)
    run_step(scheduler)
    before = scheduler.growth_ratio
    scheduler._preempt(a)
    assert scheduler.growth_ratio > before
    raised = scheduler.growth_ratio
    for _ in range(3):  # it comes back (recomputed), then steps pass without a preemption
        run_step(scheduler)
    assert GROWTH_MIN <= scheduler.growth_ratio < raised


def test_a_request_short_of_blocks_runs_serialized_before_anything_is_preempted():
    """Root and child each need a new block; the pool has one: the newest thread (the child)
    runs alone, as in serial mode, counted, and nothing is preempted. When both fit again,
    both run."""
    scheduler = Scheduler(BlockManager(num_blocks=10, block_size=4), max_batch_tokens=256)
    req = running_with_two_threads(scheduler)  # prompt: 2 full blocks; the fork copied none
    child = req.threads[1]
    for thread in req.live_threads:  # fill each thread's tail block up to its edge
        thread.token_ids.extend([3] * (4 - len(thread.token_ids) % 4 or 4))
    assert len(run_step(scheduler)) == 2
    free = scheduler.block_manager.num_free
    for thread in req.live_threads:
        thread.token_ids.append(4)  # each now needs a block of its own
    hog = Request("hog", [9] * 4 * (free - 1), SamplingParams(max_tokens=1), arrival=-1)  # takes all but one block
    scheduler.block_manager.allocate(hog.root, len(hog.root.token_ids))
    assert scheduler.block_manager.num_free == 1
    assert run_step(scheduler) == [child]
    assert req.num_serialized_steps == 1 == scheduler.num_serialized_steps and req.num_preemptions == 0
    scheduler.block_manager.free(hog.root)  # room again: both threads run
    child.token_ids.append(5)  # the child sampled its next token; the root still waits with its own
    assert set(run_step(scheduler)) == set(req.live_threads) and req.num_serialized_steps == 1
