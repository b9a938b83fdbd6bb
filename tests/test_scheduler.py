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
