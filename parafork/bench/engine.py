"""`parafork bench engine`: the engine's raw speed, measured side by side in one run.

- HF `generate` tokens/s and parafork AR tokens/s at batch 1, same prompt, same dtype,
  same number of tokens (end-of-sequence ignored);
- decode step time with 1 to 64 live threads that share one prompt's KV blocks, as APAR
  siblings do, and (where the runner's steps can be timed on an empty pool) with as many
  independent sequences, as unrelated requests are: the curve the engine measures at
  start-up (engine/step_cost.py), timed afresh here;
- achieved weight bandwidth (weight bytes x steps/s) against this machine's read
  bandwidth, measured here by summing a buffer larger than the caches; each step's floor
  (weight bytes / that bandwidth: a step can cost no less, whatever its rows) and the share
  of it the step reaches (the roofline);
- `--also BACKEND[:QUANT]` measures more backends in the same run, one after the other, and
  `--plot` draws step cost against rows, one line per backend, beside the floor;
- llama.cpp on its own (`reference_greedy`: one sequence, greedy, no engine) on the same
  GGUF and prompt: with `--backend llamacpp` the GGUF the engine runs (`ar_vs_llamacpp`
  compares like with like), with the torch backend a `--gguf` file if given;
- with the torch backend, HF `generate` at batch 1;
- prefill: one prompt of each `--prefill` length (default 256, 1,024 and 2,048 tokens; random
  ids, so the prefix cache has nothing) to its first token, prompt tokens/s, beside one HF
  forward over the same ids (torch backend).
"""
from __future__ import annotations

import time

import torch

from .. import models
from ..llm import LLM
from ..engine import step_cost
from ..engine.runner import SequenceSlice
from ..engine.thread import Request
from ..sampling import SamplingParams
from .common import add_output_args, metadata, parse_list, write_json

PROMPT = "Give me three tips for sleeping well."
THREAD_COUNTS = step_cost.ROWS
PREFILL_LENGTHS = "256,1024,2048"
KV_BLOCKS = 512  # the bench engine's KV pool


def read_bandwidth_gbs(mib: int = 512, repeats: int = 10) -> float:
    """Best of several full reads of a buffer far larger than the last-level cache. On the
    shared 2-core VMs the reading moved between 34 and 78 GB/s from one run to the next, so the
    bench reads it before and after the step timings and keeps the higher (the floor it
    implies is then the lower, and the share of it a step reaches is not flattered)."""
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_model(llm: LLM, dtype: torch.dtype):
    path = models.resolve_model_path(llm.config.model)
    return models.load_hf_model(path, llm.tokenizer, dtype, adapter=llm.adapter)


def hf_tokens_per_s(hf, prompt_ids: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    eos = hf.config.eos_token_id
    kwargs = dict(do_sample=False, attention_mask=mask, pad_token_id=eos[0] if isinstance(eos, list) else eos)
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


def prefill_tokens_per_s(llm: LLM, length: int, hf=None, repeats: int = 2) -> tuple[float, float | None]:
    """Prompt tokens/s of one `length`-token prompt to its first token through the engine (best
    of `repeats`, fresh random ids each time: no prefix-cache hit), and of one HF forward over
    the same ids where `hf` is given."""
    generator = torch.Generator().manual_seed(length)
    best, best_hf = float("inf"), float("inf")
    for _ in range(repeats):
        ids = torch.randint(1000, 40000, (length,), generator=generator).tolist()
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, mode="ar", ignore_eos=True))
        best = min(best, time.perf_counter() - start)
        if hf is not None:
            with torch.inference_mode():
                best_hf = min(best_hf, _timed(lambda: hf(torch.tensor([ids]))))
    return length / best, (length / best_hf if hf is not None else None)


def llamacpp_tokens_per_s(gguf, prompt_ids: list[int], tokens: int, threads: int) -> float:
    """llama.cpp alone, greedy, exactly `tokens` tokens (end of turn not checked), best of two."""
    from ..runners.llamacpp_runner import reference_greedy

    reference_greedy(gguf, prompt_ids, 4, threads)  # warm-up
    return max(tokens / reference_greedy(gguf, prompt_ids, tokens, threads)[1] for _ in range(2))


def step_ms(llm: LLM, prompt_ids: list[int], threads: int, context: int, steps: int) -> float:
    """Decode step time with `threads` live threads forked from one prompt of `context` tokens,
    as APAR siblings are: blocks and sequence ids come from the engine's own pools (so the
    prefix cache never sees blocks written behind its back) and go back at the end."""
    runner, bm, seq_ids = llm.engine.runner, llm.engine.block_manager, llm.engine.scheduler.seq_ids
    ids = (prompt_ids * (context // len(prompt_ids) + 1))[:context]
    request = Request("bench-step", ids, SamplingParams(), arrival=-1)
    root = request.root
    root.seq_id = seq_ids.take()
    bm.allocate(root, context)
    runner.forward([SequenceSlice(root.seq_id, ids, 0, root.block_table)])
    root.num_cached = context
    children = []
    for _ in range(threads):  # each feeds one token per step at position `context`
        child = request.fork(root, ids[-1])
        child.seq_id = seq_ids.take()
        runner.fork(root.seq_id, child.seq_id, bm.fork(root, child))
        bm.allocate(child, context + 1)
        children.append(child)
    batch = [SequenceSlice(c.seq_id, [ids[-1]], context, c.block_table) for c in children]
    try:
        for _ in range(3):
            runner.forward(batch)
        start = time.perf_counter()
        for _ in range(steps):
            runner.forward(batch)
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        for thread in [root, *children]:
            bm.free(thread)
            seq_ids.give_back(thread.seq_id)
            runner.release(thread.seq_id)


def add_arguments(p) -> None:
    add_output_args(p, plot=False)
    p.add_argument("--tokens", type=int, default=128, help="tokens per timed generation")
    p.add_argument("--steps", type=int, default=20, help="timed steps per thread count")
    p.add_argument("--prefill", default=PREFILL_LENGTHS, help="comma list of prompt lengths whose prefill is timed")
    p.add_argument("--gguf", default=None, help="torch backend: the same model as GGUF, for llama.cpp's own AR tok/s")
    p.add_argument("--also", action="append", default=[], metavar="BACKEND[:QUANT]",
                   help="measure this backend too, in the same run (e.g. torch:int8, llamacpp:q8_0); repeatable")
    p.add_argument("--plot", default=None, help="write a PNG of step cost against rows, one line per backend")


def parse_also(items: list[str]) -> list[tuple[str, str | None]]:
    """`--also` items as (backend, quant); a bad one is refused before anything runs."""
    from ..config import BACKENDS, GGUF_QUANTS, QUANTS

    out = []
    for item in items:
        backend, _, quant = item.partition(":")
        if backend not in BACKENDS or backend == "auto":
            raise ValueError(f"--also {item}: the backend must be one of {', '.join(b for b in BACKENDS if b != 'auto')}")
        if quant and not (quant in QUANTS and backend == "llamacpp" or quant == "int8" and backend == "torch"):
            raise ValueError(f"--also {item}: torch takes int8; llamacpp {', '.join(('int8',) + GGUF_QUANTS)}")
        out.append((backend, quant or None))
    return out


def plot_steps(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        rows = [int(n) for n in r["step_ms"]]
        line, = ax.plot(rows, list(r["step_ms"].values()), marker="o", label=f"{r['backend']} ({r['dtype']}), siblings")
        ax.axhline(r["floor_ms"], color=line.get_color(), linestyle=":", linewidth=1)
        if r.get("step_ms_independent"):
            ax.plot([int(n) for n in r["step_ms_independent"]], list(r["step_ms_independent"].values()), marker="s",
                    linestyle="--", color=line.get_color(), label=f"{r['backend']} ({r['dtype']}), independent")
    ax.set_xscale("log", base=2)
    ax.set_xticks(THREAD_COUNTS, [str(n) for n in THREAD_COUNTS])
    ax.set_xlabel("rows per step (siblings over one prompt; independent sequences over 256 keys each)")
    ax.set_ylabel("decode step (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Step cost against rows; dotted: weights / read bandwidth", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    """One backend's figures (the JSON as before); with `--also`, each further backend's under
    `also`, measured after it in the same run."""
    also = parse_also(getattr(args, "also", []) or [])
    result = run_one(args, args.backend, args.quant)
    results = [result]
    for backend, quant in also:
        results.append(run_one(args, backend, quant))
    if also:
        result["also"] = results[1:]
    if getattr(args, "plot", None):
        plot_steps(results, args.plot)
        print(f"wrote {args.plot}")
    write_json(result, args.json)
    return result


def _backend_name(runner) -> str:
    from ..runners.torch_runner import TorchRunner

    return "llamacpp" if runner.info.gguf is not None else "torch" if isinstance(runner, TorchRunner) else "hf"


def run_one(args, backend: str, quant: str | None) -> dict:
    torch.set_num_threads(args.cpu_threads)
    lengths = parse_list(getattr(args, "prefill", PREFILL_LENGTHS), "--prefill", kind=int)
    llm = LLM(args.model, dtype=args.dtype, cpu_threads=args.cpu_threads, num_kv_blocks=KV_BLOCKS, backend=backend,
              quant=quant)
    too_long = [n for n in lengths if n >= llm.engine.runner.info.max_position or n >= KV_BLOCKS * llm.config.block_size]
    if too_long:
        raise ValueError(f"--prefill {too_long}: longer than the model's {llm.engine.runner.info.max_position} positions "
                         f"or the bench's KV pool")
    # Independent sequences first: their timing writes into the pool, which holds nothing yet.
    independent = None
    if llm.engine.runner.info.timed_steps:
        independent = step_cost.measure(llm.engine.runner, KV_BLOCKS, llm.config.block_size, steps=args.steps // 2)
    on_llamacpp = llm.engine.runner.info.gguf is not None
    backend = _backend_name(llm.engine.runner)  # what "auto" resolved to
    dtype_name = (f"gguf {llm.config.quant or 'as given'}" if on_llamacpp else
                  ("int8 weights, " if llm.config.quant == "int8" else "") + str(llm.config.torch_dtype).removeprefix("torch."))
    gguf = llm.engine.runner.info.gguf or args.gguf
    prompt_ids = models.apply_chat_template(llm.tokenizer, PROMPT)
    print(f"parafork bench engine: model={args.model} backend={backend} "
          f"weights={dtype_name} threads={args.cpu_threads} tokens={args.tokens}")
    if llm.engine.runner.info.kernels:
        print(f"  linears                     {llm.engine.runner.info.kernels}")
    bandwidth = read_bandwidth_gbs()
    print(f"  machine read bandwidth      {bandwidth:8.1f} GB/s")
    reference = None if on_llamacpp else hf_model(llm, llm.config.torch_dtype)
    hf = hf_tokens_per_s(reference, prompt_ids, args.tokens) if reference is not None else None
    if hf:
        print(f"  HF generate                 {hf:8.1f} tok/s")
    own = llamacpp_tokens_per_s(gguf, prompt_ids, args.tokens, args.cpu_threads) if gguf else None
    if own:
        print(f"  llama.cpp alone (same GGUF) {own:8.1f} tok/s")
    ar = ar_tokens_per_s(llm, prompt_ids, args.tokens)
    print(f"  parafork AR (batch 1)       {ar:8.1f} tok/s" + (f"   {ar / hf:.2f}x HF" if hf else "")
          + (f"   {ar / own:.2f}x llama.cpp alone" if own else ""))
    achieved = llm.engine.runner.info.weight_bytes * ar / 1e9
    print(f"  achieved weight bandwidth   {achieved:8.1f} GB/s   {100 * achieved / bandwidth:.0f}% of measured")
    floor = llm.engine.runner.info.weight_bytes / (bandwidth * 1e9) * 1e3  # ms to read the weights once
    print(f"  step floor (weights / bw)   {floor:8.1f} ms   {llm.engine.runner.info.weight_bytes / 1e6:.0f} MB of weights")
    # Best of two rounds over the row counts: on the shared VMs one round's first timing (one
    # row) came out slower than its four and eight rows now and then.
    # Siblings and their root each hold a sequence id: a runner with a cap (llama.cpp's 64) stops below it.
    cap = llm.engine.runner.info.max_live_sequences
    counts = [n for n in THREAD_COUNTS if cap is None or n < cap]
    steps = {n: float("inf") for n in counts}
    for _ in range(2):
        for n in counts:
            steps[n] = min(steps[n], step_ms(llm, prompt_ids, n, context=len(prompt_ids) + args.tokens, steps=args.steps))
    again = read_bandwidth_gbs()
    if again > bandwidth:
        bandwidth = again
        floor = llm.engine.runner.info.weight_bytes / (bandwidth * 1e9) * 1e3
        print(f"  read bandwidth, read again  {bandwidth:8.1f} GB/s   step floor {floor:.1f} ms")
    for i, n in enumerate(counts):
        print(f"  step with {n:2d} live threads    {steps[n]:8.1f} ms   {steps[n] / steps[1]:.2f}x one thread"
              f"   {100 * floor / steps[n]:3.0f}% of the floor"
              + (f"   independent {independent.ms[i]:6.1f} ms {independent(n):5.2f}x" if independent else ""))
    prefill = {}
    for n in lengths:
        own_n, hf_n = prefill_tokens_per_s(llm, n, reference)
        prefill[str(n)] = {"tok_s": own_n, "hf_tok_s": hf_n}
        print(f"  prefill {n:5d} tokens         {own_n:8.1f} tok/s" + (f"   {own_n / hf_n:.2f}x HF forward" if hf_n else ""))
    return {
        "backend": backend,
        "dtype": dtype_name,
        "quant": quant,
        "kernels": llm.engine.runner.info.kernels,
        "cpu_threads": args.cpu_threads,
        "tokens": args.tokens,
        "hf_tok_s": hf,
        "ar_tok_s": ar,
        "ar_vs_hf": ar / hf if hf else None,
        "llamacpp_own_tok_s": own,
        "ar_vs_llamacpp": ar / own if own else None,
        "gguf": str(gguf) if gguf else None,
        "step_ms": {str(n): ms for n, ms in steps.items()},
        # Monotone envelope of the timings (step_cost.StepCost), as the engine uses them.
        "step_ms_independent": {str(n): ms for n, ms in zip(independent.rows, independent.ms)} if independent else None,
        "step_ratio_8_vs_1": steps[8] / steps[1],
        "step_ratio_16_vs_1": steps[16] / steps[1],
        "floor_ms": floor,
        "floor_share": {str(n): floor / ms for n, ms in steps.items()},
        "prefill": prefill,
        "bandwidth_gbs": bandwidth,
        "achieved_gbs": achieved,
        "achieved_pct": 100 * achieved / bandwidth,
        "weight_bytes": llm.engine.runner.info.weight_bytes,
        **metadata(torch.get_num_threads()),
    }
