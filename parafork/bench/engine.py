"""`parafork bench engine`: the engine's raw speed, measured side by side in one run.

- HF `generate` tokens/s and parafork AR tokens/s at batch 1, same prompt, same dtype,
  same number of tokens (end-of-sequence ignored);
- decode step time with 1/2/4/8/16 live threads that share one prompt's KV blocks, as
  APAR siblings do;
- achieved weight bandwidth (weight bytes x steps/s) against this machine's read
  bandwidth, measured here by summing a buffer larger than the caches;
- with `--gguf` (the same model as GGUF, e.g. from `parafork export` + llama.cpp's
  converter) and llama-cpp-python installed: llama.cpp's AR tokens/s on the same prompt,
  as the CPU reference line.
"""
from __future__ import annotations

import time

import torch

from .. import models
from ..engine.llm_engine import LLM
from ..engine.model_runner import ThreadSlice
from ..sampling import SamplingParams
from .common import metadata, write_json

PROMPT = "Give me three tips for sleeping well."
THREAD_COUNTS = (1, 2, 4, 8, 16)


def read_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Best of a few full reads of a buffer far larger than the last-level cache."""
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_tokens_per_s(llm: LLM, prompt_ids: list[int], tokens: int, dtype: torch.dtype) -> float:
    path = models.resolve_model_path(llm.config.model)
    hf = models.load_hf_model(path, llm.tokenizer, dtype, adapter=llm.adapter)
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, attention_mask=mask, pad_token_id=llm.tokenizer.eos_token_id)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    seconds = _timed(lambda: hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs))
    return tokens / seconds


def ar_tokens_per_s(llm: LLM, prompt_ids: list[int], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, mode="ar", ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(max_tokens=4, mode="ar"))  # warm-up
    start = time.perf_counter()
    out = llm.generate({"prompt_token_ids": prompt_ids}, params)[0]
    seconds = time.perf_counter() - start
    assert out.num_generated_tokens == tokens
    return tokens / seconds


def llamacpp_tokens_per_s(gguf: str, prompt_ids: list[int], tokens: int, threads: int) -> float:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ValueError("--gguf needs llama-cpp-python (make test-llamacpp installs it)") from e
    llama = Llama(model_path=gguf, n_ctx=len(prompt_ids) + tokens + 8, n_threads=threads, n_batch=512, verbose=False)

    def decode(n: int) -> None:  # greedy, end-of-sequence ignored: exactly n tokens
        for k, _ in enumerate(llama.generate(prompt_ids, top_k=1, temp=0.0, reset=True), 1):
            if k == n:
                break

    decode(4)  # warm-up
    return tokens / _timed(lambda: decode(tokens))


def step_ms(llm: LLM, prompt_ids: list[int], threads: int, context: int, steps: int) -> float:
    """Decode step time with `threads` live threads over one shared prefix of `context` tokens."""
    runner, bs = llm.runner, llm.config.block_size
    ids = (prompt_ids * (context // len(prompt_ids) + 1))[:context]
    shared = list(range(-(-context // bs)))
    runner.forward([ThreadSlice(ids, 0, shared)])
    # Each thread owns blocks after the shared ones; all of them feed one token per step.
    first_own = len(shared)
    tables = [shared + [first_own + i * 2, first_own + i * 2 + 1] for i in range(threads)]
    batch = [ThreadSlice([ids[-1]], context, table) for table in tables]
    for _ in range(3):
        runner.forward(batch)
    start = time.perf_counter()
    for _ in range(steps):
        runner.forward(batch)
    return (time.perf_counter() - start) / steps * 1e3


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads, num_kv_blocks=512)
    dtype_name = str(llm.config.torch_dtype).removeprefix("torch.")  # what 'auto' chose here
    prompt_ids = models.apply_chat_template(llm.tokenizer, PROMPT)
    print(f"parafork bench engine: model={args.model} dtype={dtype_name} threads={args.threads} tokens={args.tokens}")
    bandwidth = read_bandwidth_gbs()
    print(f"  machine read bandwidth      {bandwidth:8.1f} GB/s")
    hf = hf_tokens_per_s(llm, prompt_ids, args.tokens, llm.config.torch_dtype)
    print(f"  HF generate                 {hf:8.1f} tok/s")
    ar = ar_tokens_per_s(llm, prompt_ids, args.tokens)
    print(f"  parafork AR (batch 1)       {ar:8.1f} tok/s   {ar / hf:.2f}x HF")
    llamacpp = llamacpp_tokens_per_s(args.gguf, prompt_ids, args.tokens, args.threads) if args.gguf else None
    if llamacpp:
        print(f"  llama.cpp AR (--gguf)       {llamacpp:8.1f} tok/s   {llamacpp / hf:.2f}x HF, parafork AR {ar / llamacpp:.2f}x it")
    achieved = llm.runner.weight_bytes * ar / 1e9
    print(f"  achieved weight bandwidth   {achieved:8.1f} GB/s   {100 * achieved / bandwidth:.0f}% of measured")
    steps = {}
    for n in THREAD_COUNTS:
        steps[n] = step_ms(llm, prompt_ids, n, context=len(prompt_ids) + args.tokens, steps=args.steps)
        print(f"  step with {n:2d} live threads    {steps[n]:8.1f} ms   {steps[n] / steps[1]:.2f}x one thread")
    result = {
        "dtype": dtype_name,
        "threads": args.threads,
        "tokens": args.tokens,
        "hf_tok_s": hf,
        "ar_tok_s": ar,
        "ar_vs_hf": ar / hf,
        "llamacpp_tok_s": llamacpp,
        "gguf": args.gguf,
        "step_ms": {str(n): ms for n, ms in steps.items()},
        "step_ratio_8_vs_1": steps[8] / steps[1],
        "bandwidth_gbs": bandwidth,
        "achieved_gbs": achieved,
        "achieved_pct": 100 * achieved / bandwidth,
        "weight_bytes": llm.runner.weight_bytes,
        **metadata(torch.get_num_threads()),
    }
    write_json(result, args.json)
    return result
