"""Batched APAR (16 Vicuna questions at once), shared prefixes on vs off, side by side."""
import time
from parafork import LLM, SamplingParams
from parafork.bench.suite import load_suite, select
llm = LLM("bundled", cpu_threads=2)
qs = [q["prompt"] for q in select(load_suite("vicuna"), per_category=2) if q["category"] not in ("coding", "math")][:16]
res = {}
for rep in range(2):
    for label, m in (("per-thread", 10**9), ("shared", 1024)):
        llm.runner.MIN_SAVED_KEYS = m
        t = time.perf_counter(); outs = llm.generate(qs, SamplingParams(max_tokens=256)); dt = time.perf_counter() - t
        res.setdefault(label, []).append((dt, sum(len(o.token_ids) for o in outs), [o.token_ids for o in outs]))
for label, runs in res.items():
    print(label, " ".join(f"{dt:.1f}s/{n}tok" for dt, n, _ in runs))
print("same answers:", res["per-thread"][0][2] == res["shared"][0][2])
