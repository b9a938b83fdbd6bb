"""`parafork bench ceiling`: how many answer tokens per decode step could these answers give?

APAR's speed is set by how an answer is written: the root writes the intro, the heads and
whatever follows a join, the longest branch runs beside it, and answers without a list or
paragraphs do not fork at all. This bench takes written answers (`--answers`: a `bench latency`
or `bench quality` JSON, `--mode` picks whose; or a `parafork data` JSONL with an `answer` per
row) and cuts each into a tree exactly as a data recipe cuts training data (the tree reads back
as the answer, character for character). It then counts the decode steps the engine would take
if the model forked exactly there: every live thread writes one token per step, a child's
`[Child]` sits at the position after its parent's `[Fork]`, a `[Join]` waits for the last token
of the longest branch, and `[Fork]`, `[Child]`, `[Join]` and each thread's end token take a step
like any other (`data/samples.py`'s positions, which are the engine's: the last position of any
thread, minus the prompt, is the step count). `ceiling` = answer tokens / steps, by totals per
category, as `bench latency` reports tokens per step. No model runs; only its tokenizer.

Recipes (`--recipes`):
- `v2`: `extract`, data v2's cut: one list (heads stay in the root) or the paragraphs of the
  whole answer (first sentences stay), no joins;
- `v3`: `extract_groups`, data v3's cut: every list run and every prose section of three or
  more paragraphs is a group, and text after a group is written after a join;
- `v3-nojoin`: the v3 trees without their joins (text after a group written beside the bodies);
- `v3-nojoin-hN` (N = `--head-tokens`): the same with every head cut to at most N tokens, the
  rest of it moved into the body; no data recipe writes such trees: an upper bound on what
  shorter heads would give.

The ceiling is the recipe's, not a bound on the model: a model may fork where the recipe would
not. A check on the counting: on model v2's own APAR answers (`results/v2/latency_vicuna.json`,
mode `apar`, 80 questions) the `v2` recipe gives 1.57 tokens per step and the engine measured
1.56 (per category they differ both ways: common-sense 2.04 vs 2.30 measured, knowledge 2.17
vs 1.70).
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import models
from ..data.extract import JOIN, Extraction, Node, extract, extract_groups
from ..data.samples import tree_threads
from .common import add_output_args, by_category, grouped_bars, parse_list, pyplot, report, save_figure

RECIPES = ("v2", "v3", "v3-nojoin")


def without_joins(node: Node) -> Node:
    return Node([without_joins(s) if isinstance(s, Node) else s for s in node.segments if s is not JOIN])


def shorter_heads(node: Node, max_tokens: int, tokenizer) -> Node:
    """The tree with each child's head (the parent's text from the last line start before the
    child) cut to at most `max_tokens` tokens at a word boundary, the rest moved to the child's
    start. Reads back as the same text."""
    segments = list(node.segments)
    for i, segment in enumerate(segments):
        if not isinstance(segment, Node):
            continue
        child = shorter_heads(segment, max_tokens, tokenizer)
        before = segments[i - 1] if i and isinstance(segments[i - 1], str) else None
        if before is not None:
            start = before.rfind("\n") + 1
            head = before[start:]
            ids = tokenizer.encode(head, add_special_tokens=False)
            prefix = tokenizer.decode(ids[:max_tokens]) if len(ids) > max_tokens else ""
            cut = prefix.rfind(" ") if head.startswith(prefix) else -1
            if cut > 0:
                segments[i - 1] = before[:start] + head[:cut]
                first, rest = child.segments[0], child.segments[1:]
                child = Node([head[cut:] + first, *rest] if isinstance(first, str) else [head[cut:], first, *rest])
        segments[i] = child
    return Node(segments)


def tree(answer: str, recipe: str, tokenizer) -> Node:
    """The answer cut by `recipe`; an answer the recipe does not cut is one thread."""
    base = recipe.split("-")[0]
    found: Extraction = {"v2": extract, "v3": extract_groups}[base](answer)
    root = found.root if found.root is not None else Node([answer])
    if "-nojoin" in recipe:
        root = without_joins(root)
    if "-h" in recipe:
        root = shorter_heads(root, int(recipe.rsplit("-h", 1)[1]), tokenizer)
    assert root.text() == answer, "a tree must read back as its answer"
    return root


def decode_steps(root: Node, tokenizer, control) -> int:
    """Steps to decode the tree with every live thread writing one token per step: the last
    position any thread reaches (the prompt is one token at position 0)."""
    threads = tree_threads([0], root, tokenizer, control)
    return max(t.position(len(t.tokens) - 1) for t in threads)


def load_answers(path: str, mode: str | None) -> list[dict]:
    """[{category, text, measured}] from a bench JSON (`mode`'s answers; `measured`: the
    file's APAR tokens and steps for the question, where it timed them) or a data JSONL
    (`answer` per row; category: the row's `source`, else "all")."""
    p = Path(path)
    if p.suffix == ".jsonl":
        if mode:
            raise ValueError(f"--mode is for bench JSONs; {path} is a data JSONL (its `answer`s are read)")
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows or any("answer" not in r for r in rows):
            raise ValueError(f"{path}: every row needs an `answer`")
        return [{"category": r.get("source", "all"), "text": r["answer"], "measured": None} for r in rows]
    questions = json.loads(p.read_text(encoding="utf-8")).get("questions") or []
    mode = mode or "ar"
    missing = [q.get("id") for q in questions if mode not in q.get("modes", {})]
    if not questions or missing:
        raise ValueError(f"{path} has no {mode!r} answers" + (f" for questions {missing[:5]}" if questions else ""))
    out = []
    for q in questions:
        apar = q["modes"].get("apar", {})
        timed = apar.get("steps") is not None and apar.get("tokens") is not None
        out.append({"category": q["category"], "text": q["modes"][mode]["text"],
                    "measured": (apar["tokens"], apar["steps"]) if timed else None})
    return out


def run_ceiling(answers: list[dict], recipes: list[str], tokenizer, control) -> dict:
    records = []
    for a in answers:
        tokens = len(tokenizer.encode(a["text"], add_special_tokens=False))
        rec = {"category": a["category"], "tokens": tokens, "measured": a["measured"], "recipes": {}}
        for recipe in recipes:
            root = tree(a["text"], recipe, tokenizer)
            rec["recipes"][recipe] = {"steps": decode_steps(root, tokenizer, control), "threads": root.num_threads()}
        records.append(rec)

    def summarize(rs: list[dict]) -> dict:
        tokens = sum(r["tokens"] for r in rs)
        out = {"answers": len(rs), "tokens": tokens}
        for recipe in recipes:
            steps = sum(r["recipes"][recipe]["steps"] for r in rs)
            forked = [r for r in rs if r["recipes"][recipe]["threads"] > 1]
            out[recipe] = {"ceiling": tokens / steps, "fork_rate": len(forked) / len(rs),
                           "ceiling_forked": (sum(r["tokens"] for r in forked)
                                              / sum(r["recipes"][recipe]["steps"] for r in forked)) if forked else None}
        if all(r["measured"] for r in rs):
            out["measured_apar"] = sum(r["measured"][0] for r in rs) / sum(r["measured"][1] for r in rs)
        return out

    return {"recipes": recipes, "all": summarize(records), "per_category": by_category(records, summarize),
            "answers": records}


def print_table(result: dict) -> None:
    recipes = result["recipes"]
    print(f"{'category':15s} {'n':>4s} {'tokens':>7s} " + " ".join(f"{r:>16s}" for r in recipes) + f" {'measured apar':>13s}")
    rows = {**result["per_category"], "ALL": result["all"]}
    for name, row in rows.items():
        cells = " ".join(f"{row[r]['ceiling']:5.2f} ({row[r]['fork_rate']:4.0%} fork)" for r in recipes)
        measured = f"{row['measured_apar']:13.2f}" if "measured_apar" in row else f"{'-':>13s}"
        print(f"{name:15s} {row['answers']:4d} {row['tokens']:7d} {cells} {measured}")
    forked = ", ".join(f"{r} {result['all'][r]['ceiling_forked']:.2f}" for r in recipes
                       if result["all"][r]["ceiling_forked"])
    print(f"ceiling: answer tokens per decode step if the model forked exactly where the recipe cuts (by totals); "
          f"forked answers alone: {forked}")


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    categories = list(result["per_category"]) + ["ALL"]
    rows = {**result["per_category"], "ALL": result["all"]}
    series = {r: [rows[c][r]["ceiling"] for c in categories] for r in result["recipes"]}
    if all("measured_apar" in rows[c] for c in categories):
        series["measured apar"] = [rows[c]["measured_apar"] for c in categories]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(categories)), 4))
    grouped_bars(ax, categories, series)
    ax.set_ylim(0, 1.3 * max(max(v for v in values if v is not None) for values in series.values()))
    ax.legend(ncol=len(series), fontsize=8, loc="upper left")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("answer tokens per decode step")
    ax.set_title(f"step ceiling of {result['config']['answers']} ({result['config']['mode'] or 'answer'})", fontsize=9)
    save_figure(fig, path)


def add_arguments(p) -> None:
    p.add_argument("--answers", required=True,
                   help="a `bench latency`/`bench quality` JSON, or a `parafork data` JSONL (rows with `answer`)")
    p.add_argument("--mode", default=None, help="with a bench JSON: whose answers (default ar)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES))
    p.add_argument("--head-tokens", default=None,
                   help="comma list of N: also v3-nojoin with heads cut to N tokens (an upper bound)")
    add_output_args(p)


def run(args) -> dict:
    recipes = parse_list(args.recipes, "--recipes", allowed=RECIPES)
    if args.head_tokens:
        recipes += [f"v3-nojoin-h{n}" for n in parse_list(args.head_tokens, "--head-tokens", kind=int)]
    tokenizer, control = models.load_tokenizer(models.resolve_model_path(args.model))
    result = run_ceiling(load_answers(args.answers, args.mode), recipes, tokenizer, control)
    result["config"] = {"answers": args.answers, "mode": args.mode or (None if args.answers.endswith(".jsonl") else "ar"),
                        "model": args.model, "recipes": recipes}
    return report(result, args, print_table, plot)
