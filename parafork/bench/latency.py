"""`parafork bench latency`: one request at a time, every mode side by side (the paper's Fig. 4).

A bench mode is one way of answering, compared with the others: a request mode of the engine
(`SamplingParams.mode`: ar, apar, serial), one of those with a variant (`+spec`, `-unguarded`), or
a baseline outside the engine (base, hf, llamacpp, llamacpp-f16, sot). For each question the modes
run back to back (so machine drift hits them alike), greedy (`--temperature` samples the tuned
model's engine modes, seeded alike per question), with the same `max_tokens`:
- `ar`, `apar`: the parafork engine with the tuned model, forking off and on;
- `serial`: the tuned model's APAR tree decoded one thread at a time (the same answers as
  `apar`, at AR's pace): `apar_vs_serial` is APAR's parallel speed-up on identical output;
- `base`: the untuned base model, plain AR, on the parafork engine (what a user runs without APAR);
- `hf`: HF `generate` with the untuned base model (the reference implementation's baseline);
- `llamacpp`: llama.cpp on its own (one sequence, greedy, no engine), `[Fork]` banned, on the
  GGUF the engine runs with `--backend llamacpp`, else on the same model exported to Q8_0 GGUF
  (`LLAMACPP_QUANT`: llama.cpp's fastest weights on these CPUs, 122 tok/s against f16's 91 in
  `results/rows/engine.json`): `apar_vs_llamacpp` is APAR on any backend against the AR loop a
  CPU user would run instead;
- `llamacpp-f16`: the same on the model exported to F16, 16-bit weights like the torch engine's
  bf16 (`apar_vs_llamacpp_f16`: the like-for-like weights format);
- `sot`: Skeleton-of-Thought prompting with the untuned base model on the parafork engine;
- `apar-unguarded`, `serial-unguarded`: `apar` and `serial` without the answer guards (no
  budget planning, no repeated-head guard, no penalties: how parafork decoded before issue 12),
  so the guards' cost and effect are measured side by side with `apar` and `serial`;
- `ar+spec`, `apar+spec` (with `--spec ngram` or `--spec eagle`, which adds both unless `--modes`
  names one; refused without it): `ar` and `apar` with drafts
  verified inside every thread, by n-gram lookup (engine/speculation.py) or from a trained
  EAGLE-3 head (`--draft-head`, engine/eagle.py); per mode and category the draft acceptance and the
  accepted draft tokens per step, per answer whether it equals the answer without drafts
  (`same_as_plain`; greedy, so it should, unless the shared budget ran out at another point;
  None when sampled: the answers are then alike in distribution, not in text);
- `ar+ngram`, `apar+ngram`: the same with n-gram lookup's drafts whatever `--spec` is, so a
  head's modes run side by side with lookup's (`ar_spec_vs_ar_ngram`: the head over lookup alone);
- `ar+chain`, `apar+chain` (with `--spec eagle`): the head's drafts as chains alone, no siblings
  (`SamplingParams.num_draft_siblings=0`), so its trees run side by side with its chains
  (`ar_spec_vs_ar_chain`).

Per answer: answer tokens (restored text, no control tokens), tokens sampled, decode steps,
wall time, prefill time, threads, peak KV blocks, attention work (sum over fed tokens
of the KV length each attends to), stray control tokens in the text, whether list
numbering runs 1, 2, 3, `repeated_head` (two item heads equal after removing numbering,
punctuation and case), `cut` (`max_tokens` ran out with a thread unfinished) and, for `ar`,
`early_stop` (an AR answer under 60 tokens where APAR forks: the tuned model ending after
a head when it may not fork). Per mode and category: fork rate, threads per answer, tokens
per step and the rates of those checks. Speed-ups are ratios of total wall time; tokens/s ratios are given beside them,
since the modes' answers differ in length.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
import time

import torch
from tqdm.auto import tqdm

from .. import models
from ..config import EngineConfig, resolve_dtype
from ..llm import LLM
from ..data.extract import answer_layout
from ..rules import list_heads
from ..sampling import SamplingParams
from ..tokens import CHILD, FORK
from . import sot
from .common import (Checkpoint, add_output_args, add_penalty_args, add_suite_args, by_category,
                     engine_params, grouped_bars, metadata, parse_list, penalties_of, pyplot, report, resolve_penalties,
                     save_figure, timed_run)
from .suite import load_suite, select

MODES = ("ar", "apar", "serial", "base", "hf", "sot", "llamacpp", "llamacpp-f16", "ar+spec", "apar+spec", "ar+ngram",
         "apar+ngram", "ar+chain", "apar+chain", "apar-unguarded", "serial-unguarded")
EARLY_STOP_TOKENS = 60
ENGINE_MODES = ("ar", "apar", "serial", "ar+spec", "apar+spec", "ar+ngram", "apar+ngram", "ar+chain", "apar+chain",
                "apar-unguarded", "serial-unguarded")
DRAFTING = ("+spec", "+ngram", "+chain")
SPEEDUPS = {
    "apar_spec_vs_apar": ("apar+spec", "apar"),
    "apar_spec_vs_serial": ("apar+spec", "serial"),
    "ar_spec_vs_ar": ("ar+spec", "ar"),
    "apar_ngram_vs_apar": ("apar+ngram", "apar"),
    "ar_ngram_vs_ar": ("ar+ngram", "ar"),
    "apar_spec_vs_apar_ngram": ("apar+spec", "apar+ngram"),
    "ar_spec_vs_ar_ngram": ("ar+spec", "ar+ngram"),
    "apar_spec_vs_apar_chain": ("apar+spec", "apar+chain"),
    "ar_spec_vs_ar_chain": ("ar+spec", "ar+chain"),
    "apar_vs_ar": ("apar", "ar"),
    "apar_vs_serial": ("apar", "serial"),
    "apar_vs_serial_unguarded": ("apar-unguarded", "serial-unguarded"),
    "apar_vs_apar_unguarded": ("apar", "apar-unguarded"),
    "apar_vs_base": ("apar", "base"),
    "apar_vs_hf": ("apar", "hf"),
    "apar_vs_llamacpp": ("apar", "llamacpp"),
    "ar_vs_llamacpp": ("ar", "llamacpp"),
    "apar_vs_llamacpp_f16": ("apar", "llamacpp-f16"),
    "ar_vs_llamacpp_f16": ("ar", "llamacpp-f16"),
    "sot_vs_ar": ("sot", "ar"),
}


def add_arguments(p) -> None:
    add_suite_args(p)
    add_output_args(p)
    p.add_argument("--base-model", default="base", help="the untuned model (base, hf, sot)")
    p.add_argument("--modes", default=None, help="comma list of " + ", ".join(MODES) + " (default ar,apar,serial,base,hf,sot); "
                   "with --backend vllm: of vllm-ar, vllm-apar, vllm-serial, engine-apar, engine-ar "
                   "(default vllm-ar,vllm-apar,engine-apar)")
    p.add_argument("--spec", default=None, choices=["ngram", "eagle"],
                   help="what the +spec modes draft with: n-gram lookup or a trained head; adds ar+spec and "
                        "apar+spec unless --modes names +spec modes itself")
    p.add_argument("--draft-head", default=None, help="with --spec eagle: the head's folder (default 'bundled': the shipped one)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="the tuned model's engine modes sample at this temperature (default 0: greedy; the "
                        "baselines stay greedy); seeded per question, the same seed in every mode")
    p.add_argument("--seed", type=int, default=None, help="with --temperature: question i samples with seed + i (default 0)")
    add_penalty_args(p)


def numbering_intact(text: str) -> bool:
    """Every run of top-level numbered items counts 1, 2, 3, ... without gaps."""
    runs: list[list[int]] = []
    for n in (int(m.group(1)) for m in re.finditer(r"^(\d{1,2})[.)]\s", text, re.M)):
        if n == 1 or not runs:
            runs.append([])
        runs[-1].append(n)
    return all(run == list(range(run[0], run[0] + len(run))) for run in runs)


def answer_checks(text: str, finish_reason: str | None = None) -> dict:
    heads = list_heads(text)
    return {
        **answer_layout(text),  # closes_after_list, paragraphs (prose answers)
        "stray_control": text.count(FORK) + text.count(CHILD),
        "numbering_intact": numbering_intact(text),
        "repeated_head": len(set(heads)) < len(heads),  # two item heads equal after normalizing
        "cut": finish_reason == "length",  # the budget ran out with a thread unfinished
    }


class HFBaseline:
    """HF `generate`, greedy, batch 1, stopping at end of turn: what reference code runs."""

    def __init__(self, model: str, dtype: torch.dtype, block_size: int) -> None:
        path = models.resolve_model_path(model)
        self.tokenizer, control = models.load_tokenizer(path)
        self.eos = sorted(control.eos_ids)
        self.model = models.load_hf_model(path, self.tokenizer, dtype)
        self.block_size = block_size  # to state its KV in the engine's unit

    def run(self, prompt_ids: list[int], max_tokens: int) -> dict:
        ids = torch.tensor([prompt_ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=self.eos, pad_token_id=self.eos[0],
            )[0, len(prompt_ids):].tolist()
        wall = time.perf_counter() - start
        return single_sequence_record(self.tokenizer, prompt_ids, out, self.eos, wall, max_tokens, self.block_size)


def single_sequence_record(tokenizer, prompt_ids: list[int], out: list[int], eos, wall: float, max_tokens: int,
                           block_size: int) -> dict:
    """The record of a plain one-sequence greedy run outside the engine (HF generate, llama.cpp
    alone): its KV and attention work in closed form, in the engine's units."""
    answer = [t for t in out if t not in eos]
    total = len(prompt_ids) + len(out)
    return {
        "text": tokenizer.decode(answer, skip_special_tokens=True),
        "tokens": len(answer),
        "generated": len(out),
        "steps": len(out),
        "wall_s": wall,
        "prefill_s": None,
        "threads": 1,
        "peak_kv_blocks": -(-total // block_size),  # positions held, in engine blocks
        "attn_work": (total - 1) * total // 2,  # every fed position k attends to k + 1 keys
        **answer_checks(tokenizer.decode(answer, skip_special_tokens=False),
                        "length" if len(answer) == len(out) == max_tokens else "stop"),
    }


def _engine_record(llm: LLM, prompt: str, params: SamplingParams) -> dict:
    run = timed_run(llm, [prompt], params)
    out = run.outputs[0]
    return {
        "text": out.text,
        "tokens": len(out.token_ids),
        "generated": out.num_generated_tokens,
        "steps": out.num_steps,
        "wall_s": run.wall_s,
        "prefill_s": run.prefill_s,
        "threads": out.num_threads,
        "peak_kv_blocks": out.peak_kv_blocks,
        "attn_work": out.attention_work,
        "drafted": out.num_draft_tokens,
        "accepted": out.num_accepted_tokens,
        "drafted_at": list(out.drafted_at),
        "accepted_at": list(out.accepted_at),
        "head_drafted": out.num_head_draft_tokens,
        "head_accepted": out.num_head_accepted_tokens,
        "siblings": out.num_sibling_tokens,
        "siblings_accepted": out.num_accepted_sibling_tokens,
        "joins": out.shape.joins,
        "depth": out.shape.depth,
        "spine_tokens": out.shape.spine_tokens,
        "longest_branch_tokens": out.shape.longest_branch_tokens,
        **answer_checks(out.text, out.finish_reason),
    }


LLAMACPP_QUANT = "q8_0"


def _exported_gguf(llm: LLM, quant: str):
    """The model `llm` runs (adapter merged) as a GGUF for llama.cpp, exported once into the cache."""
    from dataclasses import replace

    from ..export import gguf_for

    config = replace(llm.config, backend="llamacpp", quant=quant)
    return gguf_for(config, models.resolve_model_path(llm.config.model), llm.adapter)


def _llamacpp_record(llm: LLM, prompt: str, max_tokens: int, threads: int, quant: str | None = None) -> dict:
    """llama.cpp alone, greedy AR, `[Fork]` banned: on the GGUF `llm` runs (its runner's file)
    or, on another backend, the model exported as `LLAMACPP_QUANT`; `quant`: exported as that."""
    from ..runners.llamacpp_runner import reference_greedy

    gguf = (None if quant else llm.engine.runner.info.gguf) or _exported_gguf(llm, quant or LLAMACPP_QUANT)
    prompt_ids = llm.encode(prompt)
    out, wall = reference_greedy(gguf, prompt_ids, max_tokens, threads, stop_ids=llm.control.eos_ids,
                                 banned=llm.control.ids)
    return {**single_sequence_record(llm.tokenizer, prompt_ids, out, llm.control.eos_ids, wall, max_tokens,
                                     llm.config.block_size), "gguf": Path(gguf).name}


def aggregate(records: list[dict]) -> dict:
    """Totals and means over per-question records of one mode."""
    tokens = sum(r["tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    prefill = [r["prefill_s"] for r in records if r["prefill_s"] is not None]
    steps = sum(r["steps"] for r in records)
    return {
        "answers": len(records),
        "tokens": tokens,
        "generated": sum(r["generated"] for r in records),
        "steps": steps,
        "wall_s": wall,
        "tok_s": tokens / wall if wall else 0.0,
        "tokens_per_step": tokens / max(1, steps),
        # Time per decode step (prefill taken out where known): with tokens_per_step it splits a
        # speed-up into "fewer steps" and "each step costs more with more threads".
        "step_ms": 1000 * (wall - sum(prefill)) / max(1, steps),
        "prefill_share": sum(prefill) / wall if prefill and wall else None,
        "peak_kv_blocks": max(r["peak_kv_blocks"] for r in records),
        "peak_kv_blocks_mean": sum(r["peak_kv_blocks"] for r in records) / len(records),
        "attn_work": sum(r["attn_work"] for r in records),
        "fork_rate": sum(r["threads"] > 1 for r in records) / len(records),
        "threads_mean": sum(r["threads"] for r in records) / len(records),
        "stray_control": sum(r.get("stray_control", 0) for r in records),
        "numbering_intact": sum(r.get("numbering_intact", True) for r in records) / len(records),
        "repeated_head_rate": sum(r.get("repeated_head", False) for r in records) / len(records),
        "cut_rate": sum(r.get("cut", False) for r in records) / len(records),
        "early_stop_rate": sum(r.get("early_stop", False) for r in records) / len(records),
        # Speculative modes: accepted / drafted tokens, accepted draft tokens per decode step.
        "acceptance": sum(r.get("accepted", 0) for r in records) / max(1, sum(r.get("drafted", 0) for r in records)),
        "accepted_per_step": sum(r.get("accepted", 0) for r in records) / max(1, steps),
        # With a head: the share of draft tokens it wrote (the rest by lookup) and its acceptance.
        "head_share": sum(r.get("head_drafted", 0) for r in records) / max(1, sum(r.get("drafted", 0) for r in records)),
        "head_acceptance": sum(r.get("head_accepted", 0) for r in records) / max(1, sum(r.get("head_drafted", 0) for r in records)),
        # Of the head's drafts, the siblings fed beside its chains, and how often one was the model's token.
        "sibling_share": sum(r.get("siblings", 0) for r in records) / max(1, sum(r.get("drafted", 0) for r in records)),
        "sibling_acceptance": sum(r.get("siblings_accepted", 0) for r in records) / max(1, sum(r.get("siblings", 0) for r in records)),
        "same_as_plain_rate": _share([r for r in records if r.get("same_as_plain") is not None], lambda r: r["same_as_plain"]),
        **draft_positions(records),
        **tree_shapes(records),
    }


def draft_positions(records: list[dict]) -> dict:
    """Speculative modes: per draft position j, the share of drafts reaching j that were accepted
    there (`acceptance_at`), and the tokens a verify step yields (1 + accepted draft tokens per
    draft fed: a verify step always keeps the target's own token)."""
    drafted, accepted = [], []
    for r in records:
        for total, counts in ((drafted, r.get("drafted_at", [])), (accepted, r.get("accepted_at", []))):
            total.extend([0] * (len(counts) - len(total)))
            for j, n in enumerate(counts):
                total[j] += n
    return {
        "acceptance_at": [a / d for a, d in zip(accepted, drafted) if d],
        "tokens_per_verify_step": 1 + sum(accepted) / drafted[0] if drafted and drafted[0] else None,
    }


def _share(records: list[dict], predicate) -> float | None:
    return sum(map(predicate, records)) / len(records) if records else None


def tree_shapes(records: list[dict]) -> dict:
    """Per mode: the trees' shape (engine modes; a one-sequence mode is a spine of its tokens)
    and the issue-24 rates. `prose_fork_rate`: of answers with no list and three or more
    paragraphs, the share that forked; `join_after_list_rate`: of forked answers whose text
    closes with prose after a list, the share that joined before it (None: no such answer)."""
    n = len(records)
    forked = [r for r in records if r["threads"] > 1]
    return {
        "join_rate": sum(r.get("joins", 0) > 0 for r in records) / n,
        "joins_mean": sum(r.get("joins", 0) for r in records) / n,
        "depth_mean": sum(r.get("depth", 1) for r in records) / n,
        "depth_max": max(r.get("depth", 1) for r in records),
        "spine_tokens_mean": sum(r.get("spine_tokens", r["generated"]) for r in records) / n,
        "longest_branch_tokens_mean": sum(r.get("longest_branch_tokens", 0) for r in records) / n,
        "prose_answers": sum(r.get("paragraphs", 0) >= 3 for r in records),
        "prose_fork_rate": _share([r for r in records if r.get("paragraphs", 0) >= 3], lambda r: r["threads"] > 1),
        "closing_after_list": sum(r.get("closes_after_list", False) for r in forked),
        "join_after_list_rate": _share([r for r in forked if r.get("closes_after_list")], lambda r: r.get("joins", 0) > 0),
    }


def mark_early_stops(record: dict) -> None:
    """`early_stop` on a question's `ar` answer: under 60 tokens where its `apar` answer forks;
    `same_as_plain` on a speculative answer: equal to the answer of the mode without drafts."""
    modes = record["modes"]
    sampled = any(m.get("temperature") for m in modes.values())
    if "ar" in modes and "apar" in modes:
        modes["ar"]["early_stop"] = modes["ar"]["tokens"] < EARLY_STOP_TOKENS and modes["apar"]["threads"] > 1
    for mode, drafting in ((m, m + d) for m in ("ar", "apar") for d in DRAFTING):
        if mode in modes and drafting in modes:
            # Sampled answers are equal in distribution, not in text: nothing to compare.
            modes[drafting]["same_as_plain"] = None if sampled else modes[drafting]["text"] == modes[mode]["text"]


def speedups(modes: dict[str, dict]) -> tuple[dict, dict]:
    """(wall-time ratios, tokens/s ratios) for the mode pairs that both ran."""
    wall, rate = {}, {}
    for name, (fast, slow) in SPEEDUPS.items():
        if fast in modes and slow in modes and modes[fast]["wall_s"] and modes[slow]["tok_s"]:
            wall[name] = modes[slow]["wall_s"] / modes[fast]["wall_s"]
            rate[name] = modes[fast]["tok_s"] / modes[slow]["tok_s"]
    return wall, rate


def summarize(questions: list[dict], modes: list[str]) -> dict:
    def group(qs: list[dict]) -> dict:
        stats = {m: aggregate([q["modes"][m] for q in qs]) for m in modes}
        wall, rate = speedups(stats)
        return {"modes": stats, "speedup": wall, "speedup_tok_s": rate}

    return {**group(questions), "per_category": by_category(questions, group)}


def run_latency(
    questions: list[dict],
    modes: list[str],
    model: str = "bundled",
    adapter: str | None = None,
    base_model: str = "base",
    dtype: str = "auto",
    threads: int = 2,
    max_tokens: int = 512,
    checkpoint_to: str | None = None,
    backend: str = "auto",
    quant: str | None = None,
    penalties: dict | None = None,
    spec: str = "ngram",
    draft_head: str | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict:
    """`checkpoint_to`: the JSON path; finished questions are kept beside it to resume from.
    `penalties`: frequency/presence/repetition penalties of the tuned model's guarded modes;
    `spec`: the `+spec` modes' drafts ("ngram", or "eagle" from `draft_head`); `temperature`: the
    tuned model's engine modes sample (question i with `seed + i` in every mode), the baselines stay greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    penalties = resolve_penalties(penalties, model, adapter)
    torch.set_num_threads(threads)
    # No prefix cache: a mode run after another on the same question must not find its prompt computed.
    engine = dict(dtype=dtype, cpu_threads=threads, prefix_caching=False, backend=backend, quant=quant)
    heads = {"draft_head": draft_head or "bundled"} if spec == "eagle" else {}
    tuned = LLM(model, adapter=adapter, **engine, **heads) if set(ENGINE_MODES) & set(modes) else None
    base = LLM(base_model, **engine) if {"sot", "base"} & set(modes) else None
    hf = HFBaseline(base_model, resolve_dtype(dtype), EngineConfig().block_size) if "hf" in modes else None
    for llm in filter(None, (tuned, base)):
        llm.generate("Hello", SamplingParams(max_tokens=4))  # warm-up
    given = {"model": model, "adapter": adapter, "base_model": base_model, "dtype": dtype, "threads": threads,
             "max_tokens": max_tokens, "modes": modes, "backend": backend, "quant": quant, "penalties": penalties,
             "spec": spec, "draft_head": heads.get("draft_head"), "temperature": temperature, "seed": seed}
    # Names as given, not paths (a clone elsewhere resumes too), and the adapter's digest: a
    # run must not resume over answers of another adapter shipped under the same name.
    digest = models.adapter_digest(tuned.adapter) if tuned and tuned.adapter else None
    checkpoint = Checkpoint(checkpoint_to, {**given, "adapter_digest": digest})
    config = {**given, "adapter": str(tuned.adapter) if tuned and tuned.adapter else None, "adapter_digest": digest}
    records = []
    for i, q in enumerate(tqdm(questions, desc="latency", unit="question")):
        if done := checkpoint.get(q):
            records.append(done)
            continue
        rec = {**q, "modes": {}}
        for mode in modes:
            if mode in ENGINE_MODES:
                params = engine_params(mode, max_tokens, penalties, spec)
                if temperature:
                    params = dataclasses.replace(params, temperature=temperature, seed=seed + i)
                rec["modes"][mode] = {**_engine_record(tuned, q["prompt"], params), "temperature": temperature}
            elif mode == "base":
                rec["modes"][mode] = _engine_record(base, q["prompt"], SamplingParams(max_tokens=max_tokens, mode="ar"))
            elif mode in ("llamacpp", "llamacpp-f16"):
                quant = "f16" if mode == "llamacpp-f16" else None
                rec["modes"][mode] = _llamacpp_record(tuned, q["prompt"], max_tokens, threads, quant)
            elif mode == "hf":
                rec["modes"][mode] = hf.run(models.apply_chat_template(hf.tokenizer, q["prompt"]), max_tokens)
            else:
                answer = sot.answer(base, q["prompt"], max_tokens)
                rec["modes"][mode] = {**answer, **answer_checks(answer["text"])}
        mark_early_stops(rec)
        records.append(rec)
        checkpoint.add(rec)
    result = summarize(records, modes)
    result.update(config=config, questions=records, **metadata(threads))
    checkpoint.finish()
    return result


def print_table(result: dict) -> None:
    modes = result["config"]["modes"]
    pairs = [p for p in SPEEDUPS if p in result["speedup"]]
    head = f"{'category':15s} {'n':>3s} " + " ".join(f"{m + ' tok/s':>11s}" for m in modes)
    head += " " + " ".join(f"{p:>11s}" for p in pairs) + f" {'forks':>6s} {'threads':>7s} {'tok/step':>8s} {'step ms':>7s} {'prefill':>7s} {'1,2,3':>5s} {'stray':>5s}"
    head += f" {'joins':>5s} {'depth':>5s} {'spine':>5s} {'branch':>6s} {'prose forks':>11s} {'list+join':>9s}"
    print(head)
    rows = list(result["per_category"].items()) + [("ALL", result)]
    for name, row in rows:
        ms = row["modes"]
        line = f"{name:15s} {ms[modes[0]]['answers']:3d} " + " ".join(f"{ms[m]['tok_s']:11.1f}" for m in modes)
        line += " " + " ".join(f"{row['speedup'].get(p, float('nan')):10.2f}x" for p in pairs)
        focus = ms.get("apar") or ms[modes[0]]
        prefill = focus["prefill_share"]
        line += f" {focus['fork_rate']:6.0%} {focus['threads_mean']:7.1f} {focus['tokens_per_step']:8.2f} {focus['step_ms']:7.1f}"
        line += f" {(prefill or 0):7.1%} {focus['numbering_intact']:5.0%} {focus['stray_control']:5d}"
        line += (f" {focus['join_rate']:5.0%} {focus['depth_mean']:5.2f} {focus['spine_tokens_mean']:5.0f}"
                 f" {focus['longest_branch_tokens_mean']:6.0f} {_rate(focus['prose_fork_rate'], focus['prose_answers']):>11s}"
                 f" {_rate(focus['join_after_list_rate'], focus['closing_after_list']):>9s}")
        line += "".join(f" {m} accept {ms[m]['acceptance']:.0%} {ms[m]['accepted_per_step']:.2f}/step"
                        f" {ms[m]['tokens_per_verify_step'] or 0:.2f}/verify"
                        + (f" same text {ms[m]['same_as_plain_rate']:.0%}" if ms[m]["same_as_plain_rate"] is not None else "")
                        + f" by position {'/'.join(f'{a:.0%}' for a in ms[m]['acceptance_at'][:4])}"
                        + (f" head {ms[m]['head_share']:.0%} of drafts, accept {ms[m]['head_acceptance']:.0%}"
                           if ms[m].get("head_share") else "")
                        + (f" siblings {ms[m]['sibling_share']:.0%} of drafts, taken {ms[m]['sibling_acceptance']:.0%}"
                           if ms[m].get("sibling_share") else "")
                        for m in modes if m.endswith(DRAFTING))
        print(line)
    print("forks .. branch: of the apar answers (else the first mode): forked, joined, mean thread levels, mean "
          "tokens of the root (spine) and of the longest branch; prose forks: forked / answers with no list and 3+ "
          "paragraphs; list+join: joined / forked answers closing with prose after a list")
    print("speed-ups are ratios of total wall time; tokens/s ratios:",
          ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup_tok_s"].items()) or "-")


def _rate(rate: float | None, of: int) -> str:
    return "-" if rate is None else f"{rate:.0%} of {of}"


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    pairs = [p for p in SPEEDUPS if p in result["speedup"]]
    categories = list(result["per_category"]) + ["ALL"]
    rows = [result["per_category"][c] for c in categories[:-1]] + [result]
    width = max(6, len(categories) * 0.9)
    shaped = "apar" in result["modes"]
    drafting = [m for m in result["modes"] if m.endswith(DRAFTING)]
    panels = 1 + shaped + bool(drafting)
    fig, axes = plt.subplots(panels, 1, figsize=(width, 3.8 * panels), squeeze=False)
    ax = axes[0][0]
    grouped_bars(ax, categories, {p.replace("_", " "): [r["speedup_tok_s"].get(p, 0) for r in rows] for p in pairs})
    ax.axhline(1.0, color="black", lw=0.8)
    # Tokens/s, not wall time: the modes' answers differ in length (apar and serial excepted).
    ax.set_ylabel("speed-up (ratio of tokens/s)")
    ax.set_title(f"parafork bench latency ({result['date']}, {result['commit']})")
    if shaped:  # where APAR's steps go: an answer takes at least its spine's tokens in steps
        ax = axes[1][0]
        apar = [r["modes"]["apar"] for r in rows]
        grouped_bars(ax, categories, {
            "answer tokens": [m["tokens"] / m["answers"] for m in apar],
            "decode steps": [m["steps"] / m["answers"] for m in apar],
            "spine (root's tokens)": [m["spine_tokens_mean"] for m in apar],
            "longest branch": [m["longest_branch_tokens_mean"] for m in apar],
        })
        ax.set_ylabel("apar, per answer (mean)")
    if drafting:  # what a verify step yields: 1 + the draft tokens accepted per draft fed
        ax = axes[panels - 1][0]
        grouped_bars(ax, categories, {m: [r["modes"][m]["tokens_per_verify_step"] or 1.0 for r in rows] for m in drafting})
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel("tokens per verify step")
    save_figure(fig, path)


def run(args) -> dict:
    if args.seed is not None and not args.temperature:
        raise ValueError("--seed applies with --temperature > 0 (greedy answers draw nothing)")
    if args.draft_head is not None and args.spec != "eagle":
        raise ValueError("--draft-head applies with --spec eagle (the drafts from a trained head)")
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    modes = parse_list(args.modes or "ar,apar,serial,base,hf,sot", "--modes", allowed=MODES)
    named = [m for m in modes if m.endswith("+spec")]
    if named and not args.spec:
        raise ValueError(f"--modes {','.join(named)} needs --spec ngram or --spec eagle (which drafts)")
    if (chains := [m for m in modes if m.endswith("+chain")]) and args.spec != "eagle":
        raise ValueError(f"--modes {','.join(chains)} needs --spec eagle (a trained head's drafts as chains)")
    if args.spec and not named:  # both, unless --modes names those it wants
        modes += ["ar+spec", "apar+spec"]
    result = run_latency(
        questions, modes, args.model, args.adapter, args.base_model, args.dtype, args.cpu_threads,
        args.max_tokens, args.json, args.backend, args.quant,
        penalties_of(args), args.spec or "ngram", (args.draft_head or "bundled") if args.spec == "eagle" else None,
        args.temperature, args.seed or 0,
    )
    result["config"]["suite"] = args.suite
    return report(result, args, print_table, plot)
