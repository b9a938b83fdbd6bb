"""Side by side in one run: APAR answers of the bundled model to Vicuna questions, one at a time,
shared prefixes read once per step (default) or once per thread; same answers, wall time."""
import time
from parafork import LLM, SamplingParams
from parafork.bench.suite import load_suite, select
llm = LLM("bundled", cpu_threads=2)
qs = select(load_suite("vicuna"), per_category=1)
qs = [q for q in qs if q["category"] in ("generic", "knowledge", "common-sense", "roleplay", "counterfactual")]
total = {"per-thread": 0.0, "shared": 0.0}
for q in qs:
    out = {}
    for label, m in (("per-thread", 10**9), ("shared", 1024)):
        llm.runner.MIN_SAVED_KEYS = m
        t = time.perf_counter(); o = llm.generate(q["prompt"], SamplingParams(max_tokens=512))[0]; dt = time.perf_counter() - t
        total[label] += dt
        out[label] = (o.token_ids, dt, o.num_threads)
    same = out["per-thread"][0] == out["shared"][0]
    print(f"{q['category']:15s} threads {out['shared'][2]:2d} tokens {len(out['shared'][0]):4d}  per-thread {out['per-thread'][1]:5.1f} s  shared {out['shared'][1]:5.1f} s  {out['per-thread'][1] / out['shared'][1]:.2f}x  same answer: {same}", flush=True)
print(f"all: per-thread {total['per-thread']:.1f} s, shared {total['shared']:.1f} s, {total['per-thread'] / total['shared']:.2f}x")
