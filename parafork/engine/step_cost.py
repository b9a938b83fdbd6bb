"""What a step costs as its rows grow, measured on this machine: the curve that sizes
speculative drafts (speculation.py: a draft token is fed while its expected tokens pay for
its row at the batch's current width).

A decode step reads every weight once whatever its rows, so while few rows are fed it costs
about what one row costs; past some row count the multiply-adds take over and every row
costs about as much as the last. Where that happens depends on the CPU far more than on the
code: the bundled model, bf16, 2 threads, the torch engine's row kernel, one token per
sequence over 256 keys of its own (ms a step; `parafork bench engine` prints this curve):

    rows          1     2     4     8    16    32    64
    Zen 4      11.8  10.9  13.2  16.1  25.7  56.6  83.7   (AMD EPYC family 25 model 17)
    Zen 5       7.8   7.9   8.9  11.2  15.9  29.6  55.2   (AMD EPYC family 26 model 2, results/eagle/zen5)
    Zen 5       6.9         7.4   8.1   8.4              (siblings over one prompt, read once: results/rows)

A per-row constant measured on one of them (it was 0.02 of a one-row step, from the Zen 5)
misjudges the other by 5x at 16 rows, so the engine measures the curve itself: at start-up,
before any request, it times `ROWS` rows (independent sequences over `CONTEXT` keys of
whatever the empty pool holds: timing does not depend on the keys' values), three interleaved
passes, the best of each kept, and keeps the result in the user's cache
(`$PARAFORK_CACHE/step_cost.json`), one entry per machine, runner and thread count, so it is
paid once (about 3 s for the bundled model on a 2-core Zen 4); delete the file to measure again. Runners that cannot be timed so
(llama.cpp addresses KV by sequence and wants every position before a token; the HF
fallback recomputes whole contexts) keep their fixed estimate `RunnerInfo.draft_row_cost`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .runner import Runner, SequenceSlice

log = logging.getLogger(__name__)

ROWS = (1, 2, 4, 8, 16, 32, 64)  # row counts timed; between them the cost is interpolated
CONTEXT = 256  # keys each timed sequence attends to (fewer where the pool is smaller)


@dataclass(frozen=True)
class StepCost:
    """A step's cost against its rows, in one-row steps: piecewise linear through the measured
    points (each at least the one before: a step never gets cheaper by feeding more), the last
    segment's slope beyond the last point."""

    rows: tuple[int, ...]
    ms: tuple[float, ...]
    source: str  # "measured" (this machine, `measure`) or "fixed" (the runner's constant)

    def __post_init__(self) -> None:
        if len(self.rows) < 2 or len(self.rows) != len(self.ms) or list(self.rows) != sorted(set(self.rows)) \
                or self.rows[0] != 1 or min(self.ms) <= 0:
            raise ValueError(f"a step cost needs two or more ascending row counts from 1 and positive times, "
                             f"got rows={self.rows} ms={self.ms}")

    @classmethod
    def linear(cls, row_cost: float) -> StepCost:
        """1 + row_cost * (rows - 1): the runner's fixed estimate."""
        return cls((1, 2), (1.0, 1.0 + row_cost), "fixed")

    @classmethod
    def from_times(cls, times: dict[int, float]) -> StepCost:
        rows = tuple(sorted(times))
        ms, top = [], 0.0
        for n in rows:
            top = max(top, times[n])
            ms.append(top)
        return cls(rows, tuple(ms), "measured")

    def __call__(self, rows: float) -> float:
        """The cost of a step of `rows` rows, in one-row steps."""
        return self._ms(rows) / self.ms[0]

    def marginal(self, rows: float) -> float:
        """The cost of one more row on top of `rows`, in one-row steps."""
        return self(rows + 1) - self(rows)

    def _ms(self, rows: float) -> float:
        r, m = self.rows, self.ms
        rows = max(rows, 1)
        i = next((k for k in range(1, len(r)) if rows <= r[k]), len(r) - 1)
        slope = (m[i] - m[i - 1]) / (r[i] - r[i - 1])
        return m[i - 1] + slope * (rows - r[i - 1])

    def to_json(self) -> dict:
        return {"rows": list(self.rows), "ms": list(self.ms), "source": self.source}


def time_steps(runner: Runner, num_blocks: int, block_size: int, rows: int, context: int, steps: int) -> float:
    """ms of a decode step of `rows` sequences, each feeding one token after `context` keys of its
    own, the mean of `steps` after one warm-up. The sequences' block tables are drawn from blocks
    0..num_blocks-1 in a different order each (no two share a prefix, which the runner would
    read once for all), and the step writes one K/V slot per sequence into them: only for a
    pool that holds nothing yet. Sequence ids 0..rows-1 are released afterwards."""
    per_seq = context // block_size + 1
    tables = [[(s * 7919 + j * (2 * s + 1)) % num_blocks for j in range(per_seq)] for s in range(rows)]
    batch = [SequenceSlice(s, [1], context, table) for s, table in enumerate(tables)]
    try:
        runner.forward(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            runner.forward(batch)
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        for s in range(rows):
            runner.release(s)


def measure(runner: Runner, num_blocks: int, block_size: int, row_counts=ROWS, steps: int = 4,
            rounds: int = 3) -> StepCost:
    """Times `row_counts` on an empty pool (see `time_steps`), with as many keys per sequence as
    `CONTEXT` or the pool allows: `rounds` passes over all row counts, the best of each kept.
    Interleaved, so that a burst of other work on the machine (which a measurement kept for
    good must not carry) slows one pass of every count rather than every pass of one: a single
    pass taken beside a test run read 17 / 23 / 55 ms at 1 / 4 / 8 rows where a quiet one read
    10 / 12 / 15."""
    context = max(block_size, min(CONTEXT, (num_blocks - 1) * block_size - 1))
    best = {n: float("inf") for n in row_counts}
    for _ in range(rounds):
        for n in row_counts:
            best[n] = min(best[n], time_steps(runner, num_blocks, block_size, n, context, steps))
    return StepCost.from_times(best)


def cache_key(runner: Runner, dtype: torch.dtype, backend: str) -> str:
    from ..config import machine_key

    info = runner.info
    return (f"{machine_key()} | {backend} {dtype} {info.kernels} | {torch.get_num_threads()} threads | "
            f"{info.weight_bytes} weight bytes, vocabulary {info.vocab_size}")


def cached(path: Path, key: str, make) -> StepCost:
    """The curve stored under `key` in the JSON file `path`, else `make()`'s, stored there."""
    try:
        store = json.loads(path.read_text())
    except (OSError, ValueError):
        store = {}
    if key in store:
        entry = store[key]
        return StepCost(tuple(entry["rows"]), tuple(entry["ms"]), "measured")
    log.info("timing decode steps of %s rows on this machine (once; kept in %s)", ",".join(map(str, ROWS)), path)
    curve = make()
    store[key] = curve.to_json()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(store, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only cache costs a measurement per start, nothing else
        log.warning("could not keep the step timings in %s: %s", path, e)
    return curve
