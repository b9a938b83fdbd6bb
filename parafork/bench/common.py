"""What every benchmark shares: arguments, run metadata, JSON output, per-category grouping,
plots, percentiles, timed engine runs."""
from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import models
from ..config import cpu_has_fast_bf16, machine_key
from ..engine.outputs import RequestOutput
from ..llm import LLM, Prompt
from ..sampling import PENALTIES, SamplingParams


def add_suite_args(p, max_tokens: int = 512) -> None:
    p.add_argument("--suite", default="vicuna", help="'vicuna' (the file named by $PARAFORK_VICUNA), 'mtbench', 'starter' (18 questions shipped with parafork), or a question.jsonl file")
    p.add_argument("--limit", type=int, default=None, help="first N questions")
    p.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="per answer, over all threads")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to merge into --model")


def add_penalty_args(p) -> None:
    for name in PENALTIES:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help="for the tuned model's modes (not the -unguarded ones); default: the model's")


def penalties_of(args) -> dict:
    """The penalties asked for on the command line (None: the model's default)."""
    return {name: getattr(args, name, None) for name in PENALTIES}


def resolve_penalties(penalties: dict | None, model: str, adapter: str | None) -> dict:
    """The penalties the tuned model's guarded modes run with: those given, else the model's
    defaults (`models.sampling_defaults`), else off. Recorded in every result's config."""
    path, adapter = models.resolve_model_path(model), adapter or models.default_adapter(model)
    defaults = {**PENALTIES, **models.sampling_defaults(path, adapter)}
    return {name: v if (v := (penalties or {}).get(name)) is not None else defaults[name] for name in PENALTIES}


def engine_params(mode: str, max_tokens: int, penalties: dict, spec: str = "ngram") -> SamplingParams:
    """The request a tuned-model mode sends: `apar+spec` is `apar` with drafts (`spec`: "ngram"
    or "eagle"), `apar+ngram` with n-gram lookup's whatever `spec` is (the two drafters side by
    side), `apar+chain` with the head's as chains (no siblings), and an `-unguarded` mode has the
    answer guards off (budget planning, head guard, penalties)."""
    plain = mode.removesuffix("+spec").removesuffix("+ngram").removesuffix("+chain").removesuffix("-unguarded")
    if mode.endswith("-unguarded"):
        return SamplingParams(max_tokens=max_tokens, mode=plain, speculative="off", plan_budget=False,
                              no_repeat_heads=False, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0)
    if mode.endswith("+chain"):
        return SamplingParams(max_tokens=max_tokens, mode=plain, speculative="eagle", num_draft_siblings=0, **penalties)
    drafts = spec if mode.endswith("+spec") else "ngram" if mode.endswith("+ngram") else "off"
    return SamplingParams(max_tokens=max_tokens, mode=plain, speculative=drafts, **penalties)


def add_output_args(p, plot: bool = True) -> None:
    p.add_argument("--json", default=None, help="write all figures here")
    if plot:
        p.add_argument("--plot", default=None, help="write a PNG plot here")


def parse_list(text: str, flag: str, kind: type = str, allowed: tuple | None = None) -> list:
    """A comma list for `flag`: each item of `kind` (positive for int), from `allowed` if given."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    bad = [v for v in values if (allowed and v not in allowed) or (kind is int and v < 1)]
    if not values or bad:
        what = ", ".join(allowed) if allowed else "positive integers" if kind is int else "values"
        raise ValueError(f"{flag} takes a comma list of {what}; got {text!r}")
    return values


def by_category(records: list[dict], summarize: Callable[[list[dict]], dict]) -> dict:
    """`summarize` applied to each category's records, categories in sorted order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    return {category: summarize(rs) for category, rs in sorted(groups.items())}


def grouped_bars(ax, categories: list[str], series: dict[str, list[float]]) -> None:
    """One group of bars per category, one bar per series."""
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))], values, width, label=label)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.legend(fontsize="small", ncol=2 if len(series) > 4 else 1)  # many series: two columns, less of the bars hidden


def _code_commit() -> str:
    """The checkout's commit, '+dirty' where tracked files differ from it; 'unknown' outside git."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, cwd=here.parent).stdout.strip()
    except OSError:
        return "unknown"
    return (commit + ("+dirty" if changed else "")) if commit else "unknown"


# Read when the benches are imported, not when a run ends: a long run records the code it ran,
# not a commit made while it ran (a 30-minute soak once recorded the commit made after it started).
CODE_COMMIT = _code_commit()


def metadata(threads: int) -> dict:
    return {
        "commit": CODE_COMMIT,
        "machine": f"{machine_key()}, {threads} torch threads",
        "native_bf16": cpu_has_fast_bf16(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }


def write_json(result: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


class Checkpoint:
    """Per-question records appended as they finish (`OUT.json.partial.jsonl`), so a run
    stopped midway resumes where it stopped; records of a different configuration, or timed on
    another kind of CPU, are ignored."""

    def __init__(self, json_path: str | None, config: dict) -> None:
        self.path = Path(f"{json_path}.partial.jsonl") if json_path else None
        config = {**config, "machine": machine_key()}
        self.records: dict[str, dict] = {}
        if self.path and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and json.loads(lines[0]) == {"config": config}:
                for line in lines[1:]:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short when the run was stopped
                        continue
                    self.records[str(record["id"])] = record
                print(f"resuming from {self.path}: {len(self.records)} questions done")
        if self.path and not self.records:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"config": config}) + "\n", encoding="utf-8")

    def get(self, question: dict) -> dict | None:
        record = self.records.get(str(question["id"]))
        return record if record and record.get("prompt") == question["prompt"] else None

    def add(self, record: dict) -> None:
        self.records[str(record["id"])] = record
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        """The run is complete (its JSON follows): the partial file is no longer needed."""
        if self.path:
            self.path.unlink(missing_ok=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print(f"wrote {path}")


def report(result: dict, args, print_table, plot) -> dict:
    """The table on stdout, then the JSON and the plot where asked for."""
    print_table(result)
    write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return result


@dataclass
class TimedRun:
    outputs: list[RequestOutput]  # in prompt order
    wall_s: float
    prefill_s: float  # the first step: the prompts' prefill (and first tokens)
    steps: int  # engine steps the run took
    peak_pool_blocks: int  # KV blocks in use in the whole pool, at the fullest step


def timed_run(llm: LLM, prompts: list[Prompt], params: SamplingParams) -> TimedRun:
    """Prompts run together to completion, stepped by hand to time the prefill apart."""
    ids = [llm.add_request(p, params, stream=False) for p in prompts]
    done: dict[str, RequestOutput] = {}
    steps_before, start = llm.engine.total_steps, time.perf_counter()
    prefill_s, peak = 0.0, 0
    try:
        while len(done) < len(ids):
            for out in llm.step():
                if out.finished:
                    done[out.request_id] = out
            prefill_s = prefill_s or time.perf_counter() - start
            peak = max(peak, llm.engine.block_manager.num_blocks - llm.engine.block_manager.num_free)
    finally:
        for request_id in ids:
            llm.abort(request_id)
    return TimedRun([done[i] for i in ids], time.perf_counter() - start, prefill_s, llm.engine.total_steps - steps_before, peak)
