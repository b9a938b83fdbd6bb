"""Side by side in one run: a prompt's prefill through the padded attention path (the one before
the fused path: SHORT_SLICE above the prompt length puts it there) and through fused attention."""
import time, torch
from parafork import LLM, SamplingParams
from parafork.engine.torch_runner import TorchRunner
llm = LLM("bundled", cpu_threads=2)
for n in (256, 1024, 2048):
    g = torch.Generator().manual_seed(n)
    res = {}
    for r in range(2):
        for label, short in (("padded", 10**6), ("fused", 16)):
            ids = torch.randint(1000, 40000, (n,), generator=g).tolist()
            llm.runner.SHORT_SLICE = short
            t = time.perf_counter(); llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, mode="ar", ignore_eos=True))
            res.setdefault(label, []).append(time.perf_counter() - t)
    p, f = min(res["padded"]), min(res["fused"])
    print(f"{n:5d} tokens: padded {p:6.2f} s ({n / p:6.1f} tok/s)  fused {f:6.2f} s ({n / f:6.1f} tok/s)  {p / f:.2f}x", flush=True)
