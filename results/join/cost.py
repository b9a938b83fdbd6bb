"""Cost of a join on a forced tree (bundled model, forced rule): steps, wall time and peak KV
blocks of the same two-group tree with and without its joins, side by side, best of 3.
Run: .venv/bin/python results/join/cost.py"""
import time

from parafork.config import machine_key
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams

llm = LLM("bundled", block_size=16, num_kv_blocks=512)
forks = frozenset({3, 8, 16, 20})
runs = {
    "joined": (ForceForks(llm.control, forks, child_tokens=40, root_tokens=60, join_after=frozenset({12, 24})), True),
    "fork only": (ForceForks(llm.control, forks, child_tokens=40, root_tokens=58), False),
}
print(machine_key(), llm.config.dtype)
for name, (rule, join) in runs.items():
    best = None
    for _ in range(3):
        params = SamplingParams(max_tokens=400, join=join, plan_budget=False, no_repeat_heads=False, logits_rules=[rule])
        start = time.perf_counter()
        out = llm.generate("Give me three tips for sleeping well.", params)[0]
        wall = time.perf_counter() - start
        best = min(best or (wall, out), (wall, out), key=lambda x: x[0])
    wall, out = best
    print(f"{name:10s} threads {out.num_threads} tokens {out.num_generated_tokens} steps {out.num_steps} "
          f"peak KV blocks {out.peak_kv_blocks} wall {wall:.2f} s")
llm.check_idle()
