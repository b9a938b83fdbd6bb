"""`parafork bench forks`: does a model fork, where, and how many steps does it save?

Greedy APAR answers to a question suite (Vicuna Bench by default), per category: the
share of answers that fork, threads per forking answer, decode steps (APAR) against the
tokens the same restored answer would take to decode one by one (the step ceiling of
the answer, no AR run needed), stray control tokens, and numbered lists whose numbering
runs in order. With `--ar` it also decodes AR answers and reports the step ratio of the
two runs.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from ..engine.llm_engine import LLM
from ..sampling import SamplingParams
from ..tokens import CHILD, FORK
from .suite import NON_FORKING, load_suite, select


def numbering_intact(text: str) -> bool:
    """Every run of top-level numbered items counts 1, 2, 3, ... without gaps."""
    numbers = [int(m.group(1)) for m in re.finditer(r"^(\d{1,2})[.)]\s", text, re.M)]
    runs, current = [], []
    for n in numbers:
        if n == 1 and current:
            runs.append(current)
            current = []
        current.append(n)
    runs.append(current)
    return all(run == list(range(run[0], run[0] + len(run))) for run in runs if run)


def evaluate(llm: LLM, questions: list[dict], max_tokens: int, with_ar: bool) -> dict:
    prompts = [q["prompt"] for q in questions]
    params = SamplingParams(max_tokens=max_tokens, mode="apar")
    records = []
    apar = llm.generate(prompts, params, use_tqdm=True)
    ar = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, mode="ar"), use_tqdm=True) if with_ar else None
    for i, (q, out) in enumerate(zip(questions, apar)):
        rec = {
            **q,
            "text": out.text,
            "threads": out.num_threads,
            "steps": out.num_steps,
            "tokens": out.num_generated_tokens,
            "answer_tokens": len(out.token_ids),
            "stray_control": FORK in out.text or CHILD in out.text,
            "numbering_intact": numbering_intact(out.text),
        }
        if ar is not None:
            rec["ar_steps"] = ar[i].num_steps
        records.append(rec)
    return {"per_category": summarize(records), "questions": records}


def summarize(records: list[dict]) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
        groups["all"].append(r)
        if r["category"] not in NON_FORKING:
            groups["forking categories"].append(r)
    out = {}
    for name, rs in groups.items():
        forked = [r for r in rs if r["threads"] > 1]
        row = {
            "answers": len(rs),
            "fork_rate": len(forked) / len(rs),
            "threads_per_forking_answer": sum(r["threads"] for r in forked) / max(1, len(forked)),
            "step_ceiling": sum(r["answer_tokens"] for r in rs) / max(1, sum(r["steps"] for r in rs)),
            "stray_control": sum(r["stray_control"] for r in rs),
            "numbering_intact": sum(r["numbering_intact"] for r in rs) / len(rs),
        }
        if all("ar_steps" in r for r in rs):
            row["ar_vs_apar_steps"] = sum(r["ar_steps"] for r in rs) / max(1, sum(r["steps"] for r in rs))
        out[name] = row
    return out


def run(args) -> dict:
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    llm = LLM(args.model, adapter=args.adapter, dtype=args.dtype, num_threads=args.threads)
    result = evaluate(llm, questions, args.max_tokens, args.ar)
    print(f"{'category':20s} {'n':>3s} {'forks':>6s} {'threads':>7s} {'ceiling':>7s} {'AR/APAR':>7s} {'stray':>5s} {'1,2,3':>5s}")
    for name, row in sorted(result["per_category"].items()):
        ratio = f"{row['ar_vs_apar_steps']:.2f}" if "ar_vs_apar_steps" in row else "-"
        print(
            f"{name:20s} {row['answers']:3d} {row['fork_rate']:6.0%} {row['threads_per_forking_answer']:7.1f} "
            f"{row['step_ceiling']:7.2f} {ratio:>7s} {row['stray_control']:5d} {row['numbering_intact']:5.0%}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result
