"""`parafork demo` (and `make demo`): APAR on a real prompt, against like-for-like baselines.

1. APAR with the tuned model, shown live: one line per thread (its item head and growing
   body) while the threads advance side by side; then the restored answer.
2. The same answer decoded serially (`mode="serial"`: the same tree, one thread at a time).
3. The untuned base model's plain AR answer on the same engine: what a user runs without APAR.
Then a verdict that compares like with like: APAR vs serial in wall-clock time when the texts
are identical (else tokens/s, saying why), APAR vs the base model in tokens/s and in time to a
complete answer, with the CPU, dtype and thread count named.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from .config import resolve_dtype
from .engine.outputs import RequestOutput
from .llm import LLM
from .sampling import SamplingParams



@dataclass
class Run:
    label: str
    out: RequestOutput
    seconds: float
    after_joins: list[tuple[int, str]] = field(default_factory=list)  # (branches joined, text written after)

    @property
    def tok_s(self) -> float:
        return len(self.out.token_ids) / self.seconds

    def figures(self) -> str:
        o = self.out
        cut = " (cut at max_tokens)" if o.finish_reason == "length" else ""
        joins = f" {o.shape.joins:2d} joins" if o.shape else ""
        return (f"{self.label:34s} {len(o.token_ids):5d} tokens {o.num_steps:5d} steps {o.num_threads:3d} threads{joins} "
                f"{self.seconds:7.1f} s {self.tok_s:7.1f} tok/s{cut}")


def _thread_lines(llm: LLM, root, width: int = 70) -> list[tuple[str, str, bool]]:
    """(head, body so far, finished) per child thread, in reading order."""
    lines = []

    def walk(thread) -> None:
        for index, child in sorted(thread.children.items()):
            head = llm.tokenizer.decode(thread.own_tokens[:index], skip_special_tokens=True).rstrip().split("\n")[-1]
            body = llm.tokenizer.decode(child.own_tokens, skip_special_tokens=True).strip().replace("\n", " ")
            lines.append((head[:40], body[-width:], child.finished))
            walk(child)

    walk(root)
    return lines


def after_joins(tokenizer, root) -> list[tuple[int, str]]:
    """Per `[Join]` of a finished tree (the root's in order, then its children's): how many
    branches it joined, and the text its thread wrote after it up to that thread's next fork,
    join or end: the text decoded with every joined branch in view."""
    found = []

    def walk(thread) -> None:
        own = [j for j in thread.joins if j.owner is thread]
        stops = sorted([thread.own_start + i for i in thread.children] + [j.index for j in own] + [len(thread.token_ids)])
        for join in own:
            end = next(k for k in stops if k > join.index)
            text = tokenizer.decode(thread.token_ids[join.index + 1 : end], skip_special_tokens=True).strip()
            found.append((len(join.children), text))
        for _, child in sorted(thread.children.items()):
            walk(child)

    walk(root)
    return found


def run_apar(llm: LLM, prompt: str, params: SamplingParams, live: bool) -> Run:
    """The APAR answer, with a live view of its threads when `live`."""
    start = time.perf_counter()
    request_id = llm.add_request(prompt, params, stream=False)
    root = llm.request_tree(request_id)  # held past the request's end, to read its joins
    out = None
    if not live:
        while out is None:
            out = next((o for o in llm.step() if o.request_id == request_id and o.finished), None)
        return Run("APAR (tuned model)", out, time.perf_counter() - start, after_joins(llm.tokenizer, root))
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def view() -> Table:
        table = Table(title=f"APAR threads, step {llm.engine.total_steps - first_step}", expand=True)
        table.add_column("item head", ratio=2, no_wrap=True)
        table.add_column("body, as it grows", ratio=5, no_wrap=True)
        table.add_column("", width=4)
        root = llm.request_tree(request_id)
        for head, body, finished in _thread_lines(llm, root) if root else []:
            table.add_row(head, body, "done" if finished else "...")
        return table

    first_step = llm.engine.total_steps
    with Live(view(), console=Console(), refresh_per_second=8, transient=False) as screen:
        while out is None:
            out = next((o for o in llm.step() if o.request_id == request_id and o.finished), None)
            if out is None:
                screen.update(view())
    return Run("APAR (tuned model)", out, time.perf_counter() - start, after_joins(llm.tokenizer, root))


def _timed(llm: LLM, prompt: str, params: SamplingParams, label: str) -> Run:
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    return Run(label, out, time.perf_counter() - start)


def verdict(apar: Run, serial: Run, base: Run, machine: str) -> list[str]:
    lines = []
    if apar.out.num_threads == 1:  # nothing ran side by side: say so rather than print a ratio of noise
        lines.append("The model did not fork on this prompt: APAR decoded it as one thread, as AR would "
                     "(try another --prompt; the bundled model forks in about 3 of 4 list-like answers)")
    if apar.out.text == serial.out.text:
        lines.append(f"APAR vs the same answer decoded serially: {serial.seconds / apar.seconds:.2f}x faster "
                     f"(wall clock, identical text; {serial.out.num_steps} steps -> {apar.out.num_steps})")
    else:
        lines.append(f"APAR vs serial: {apar.tok_s / serial.tok_s:.2f}x tokens/s (the texts differ, {len(apar.out.token_ids)} "
                     f"vs {len(serial.out.token_ids)} tokens: batched rounding can change a greedy choice, and the "
                     "trees part from there, so wall clock would not compare like with like)")
    if apar.out.shape and apar.out.shape.joins:
        lines.append(f"APAR joined {apar.out.shape.joins}x: the text after each [Join] was written with every branch "
                     "before it in view, on their KV as it lies (nothing recomputed)")
    def state(run: Run) -> str:
        return "complete" if run.out.finish_reason == "stop" else "cut at max_tokens"

    lines.append(f"APAR vs the untuned model's plain AR: {apar.tok_s / base.tok_s:.2f}x tokens/s; the APAR answer "
                 f"({state(apar)}) in {apar.seconds:.1f} s, the base model's ({state(base)}) in {base.seconds:.1f} s")
    lines.append(f"Machine: {machine}")
    return lines


def main(args) -> int:
    from .config import engine_options
    from .config import machine_key

    tuned = LLM(args.model, **engine_options(args))
    if not tuned.adapter:
        print("parafork demo needs an APAR-tuned model (the 'bundled' one); this one never forks.", file=sys.stderr)
        return 2
    base = LLM("base", **engine_options(args))
    params = dict(max_tokens=args.max_tokens)
    live = args.live and sys.stdout.isatty()
    print(f"Prompt: {args.prompt}\n")
    for llm in (tuned, base):
        llm.generate(args.prompt, SamplingParams(max_tokens=4))  # warm-up
    apar = run_apar(tuned, args.prompt, SamplingParams(mode="apar", **params), live)
    print(f"\n===== APAR answer, restored in reading order =====\n{apar.out.text}\n")
    for branches, text in apar.after_joins:
        print(f"===== Written after [Join], with the {branches} branches above it in view =====\n{text}\n")
    serial = _timed(tuned, args.prompt, SamplingParams(mode="serial", **params), "serial (same tree, one thread)")
    base_run = _timed(base, args.prompt, SamplingParams(mode="ar", **params), "untuned base model, plain AR")
    print(f"===== The untuned base model's plain AR answer =====\n{base_run.out.text}\n")
    for run in (apar, serial, base_run):
        print(run.figures())
    dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    print()
    for line in verdict(apar, serial, base_run, f"{machine_key()}, {dtype}, {args.cpu_threads} CPU threads"):
        print(line)
    return 0
