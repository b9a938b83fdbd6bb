"""Side by side in one run: decode step time with N live threads forked from one prompt, the
shared prefix read once per step (cascade) or once per thread (padded)."""
import sys
from parafork import LLM, models
from parafork.bench.engine import step_ms, PROMPT
llm = LLM("bundled", cpu_threads=2, num_kv_blocks=512)
ids = models.apply_chat_template(llm.tokenizer, PROMPT)
for ctx in (166, 400, 800):
    for n in (2, 4, 8, 16):
        res = {}
        for rep in range(2):
            for label, m in (("per-thread", 10**9), ("shared", 1024)):
                llm.runner.MIN_SAVED_KEYS = m
                res.setdefault(label, []).append(step_ms(llm, ids, n, context=ctx, steps=8))
        a, b = min(res["per-thread"]), min(res["shared"])
        print(f"context {ctx:4d}, {n:2d} threads: per-thread {a:6.1f} ms  shared {b:6.1f} ms  {a / b:.2f}x", flush=True)
