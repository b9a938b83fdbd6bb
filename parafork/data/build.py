"""`parafork data`: every ShareGPT exchange -> paragraph trees (JSONL), statistics and plots.

Every assistant turn counts, with the chat before it as context (`sharegpt.exchanges`);
an answer seen before (ShareGPT repeats some) is skipped. Answers with no structure that
pass the filters are kept apart as plain samples, so training can mix them in (the model
must keep writing plain answers where nothing forks). The branch-independence check is a
second, resumable step (`independence.check_folder`).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from .extract import Node, extract
from .sharegpt import MAX_CONTEXT_CHARS, exchanges, iter_conversations, packaged_sharegpt_path


def build(
    input_path: Path | None,
    out_dir: Path,
    limit: int | None = None,
    seed: int = 0,
    max_context_chars: int = MAX_CONTEXT_CHARS,
) -> dict:
    """Writes trees.jsonl and plain.jsonl (each shuffled), stats.json and stats.png."""
    path = Path(input_path) if input_path else packaged_sharegpt_path()
    out_dir.mkdir(parents=True, exist_ok=True)
    trees, plain = [], []
    reasons: Counter[str] = Counter()
    seen_answers: set[bytes] = set()
    exchanges_seen = 0
    for conv in tqdm(iter_conversations(path), desc="extract", unit=" conv"):
        for ex in exchanges(conv, max_context_chars):
            exchanges_seen += 1
            digest = hashlib.blake2b(ex["answer"].encode(), digest_size=16).digest()
            if digest in seen_answers:
                reasons["repeated answer"] += 1
                continue
            seen_answers.add(digest)
            e = extract(ex["answer"])
            reasons[e.reason] += 1
            record = {"key": f"{conv.get('id')}:{ex['turn']}", **ex}
            if e.root is not None:
                trees.append({**record, "kind": e.kind, "tree": e.root.to_json()})
            elif e.reason == "no structure":
                plain.append(record)
        if limit and len(trees) >= limit:
            break
    random.Random(seed).shuffle(trees)
    random.Random(seed).shuffle(plain)
    for name, rows in (("trees.jsonl", trees), ("plain.jsonl", plain)):
        write_jsonl(out_dir / name, rows)
    stats = {"source": str(path), "exchanges": exchanges_seen, "rejected": dict(reasons), **tree_stats(trees, plain)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    plot_stats(trees, out_dir / "stats.png")
    return stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _shape(tree: list) -> tuple[int, int]:
    """(threads, depth) of a tree in JSON form."""
    kids = [_shape(s) for s in tree if isinstance(s, list)]
    return 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)


def items(tree: list) -> list[tuple[str, str]]:
    """(head, body) of every branch of a tree in JSON form, depth first: the head is the
    parent's text on the line before the fork, the body the branch's whole text."""
    out = []
    for i, s in enumerate(tree):
        if isinstance(s, list):
            before = tree[i - 1] if i and isinstance(tree[i - 1], str) else ""
            out.append((before.rsplit("\n", 1)[-1], Node.from_json(s).text()))
            out += items(s)
    return out


def _quantiles(values: list[int]) -> dict:
    v = sorted(values)
    if not v:
        return {}
    return {"p10": v[len(v) // 10], "median": v[len(v) // 2], "p90": v[len(v) * 9 // 10], "mean": round(sum(v) / len(v), 1)}


def tree_stats(trees: list[dict], plain: list[dict]) -> dict:
    """Counts and length distributions (characters) of a set of trees."""
    pieces = [p for t in trees for p in items(t["tree"])]
    return {
        "trees": len(trees),
        "branches": sum(_shape(t["tree"])[0] - 1 for t in trees),
        "plain": len(plain),
        "kinds": dict(Counter(t["kind"] for t in trees).most_common()),
        "with_context": sum(1 for t in trees if t.get("context")),
        "depths": {str(k): v for k, v in sorted(Counter(_shape(t["tree"])[1] for t in trees).items())},
        "items_per_tree": _quantiles([sum(isinstance(s, list) for s in t["tree"]) for t in trees]),
        "head_chars": _quantiles([len(h.strip()) for h, _ in pieces]),
        "body_chars": _quantiles([len(b.strip()) for _, b in pieces]),
        "answer_chars": _quantiles([len(t["answer"]) for t in trees]),
    }


def plot_stats(trees: list[dict], path: Path) -> None:
    """Five panels: items per tree, head and body lengths, depth, kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pieces = [p for t in trees for p in items(t["tree"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    per_tree = [sum(isinstance(s, list) for s in t["tree"]) for t in trees]
    axes[0, 0].hist(per_tree, bins=range(0, min(max(per_tree, default=1), 30) + 2), color="#4a7", edgecolor="white")
    axes[0, 0].set(xlabel="items (top-level branches) per tree", ylabel="trees")
    axes[0, 1].hist([min(len(h.strip()), 250) for h, _ in pieces], bins=50, color="#37a")
    axes[0, 1].set(xlabel="head characters (250+ in the last bin)", ylabel="branches")
    axes[0, 2].hist([min(len(b.strip()), 1500) for _, b in pieces], bins=50, color="#d73")
    axes[0, 2].set(xlabel="body characters (1500+ in the last bin)", ylabel="branches")
    depths = Counter(_shape(t["tree"])[1] for t in trees)
    axes[1, 0].bar([str(k) for k in sorted(depths)], [depths[k] for k in sorted(depths)], color="#777")
    axes[1, 0].set(xlabel="depth (threads on the longest root-to-leaf path)", ylabel="trees")
    kinds = Counter(t["kind"] for t in trees).most_common()
    axes[1, 1].barh([k for k, _ in kinds], [n for _, n in kinds], color="#a5c")
    axes[1, 1].set(xlabel="trees")
    axes[1, 2].axis("off")
    axes[1, 2].text(0, 0.5, f"{len(trees)} trees\n{len(pieces)} branches\n"
                    f"{sum(1 for t in trees if t.get('context'))} with earlier turns as context", fontsize=12)
    fig.suptitle(f"{len(trees)} paragraph trees, {len(pieces)} branches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_folder(folder: Path, model_name: str = "base", threshold: float | None = None, limit: int | None = None) -> dict:
    """Scores the branches of `folder`'s trees in file order (resumable: scores.jsonl gains a
    line per tree, and trees already scored with as many branches are skipped; the last line
    of a key counts), then writes the checked set:
    checked.jsonl (dependent branches merged back; trees left with < 2 branches and depth 2
    move to demoted.jsonl, plain answers) and check.json (trees and branches before/after)."""
    import time

    import torch

    from .. import models
    from .independence import DEFAULT_THRESHOLD, BranchScore, merge_dependent, score_tree
    from .sharegpt import messages

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    all_trees = read_jsonl(folder / "trees.jsonl")
    trees = all_trees[:limit]
    scores_path = folder / "scores.jsonl"
    done = {r["key"]: r for r in read_jsonl(scores_path)} if scores_path.exists() else {}
    # A tree re-extracted with other branches since it was scored is scored again.
    todo = [t for t in trees if len(done.get(t["key"], {}).get("alone", ())) != _shape(t["tree"])[0] - 1]
    seconds = 0.0
    if todo:
        path = models.resolve_model_path(model_name)
        tokenizer, control = models.load_tokenizer(path)
        model = models.load_hf_model(path, tokenizer, torch.float32)
        with open(scores_path, "a", encoding="utf-8") as out:
            bar = tqdm(todo, desc="independence", unit=" tree")
            for record in bar:
                start = time.perf_counter()
                prompt_ids = models.apply_chat_template(tokenizer, messages(record))
                found = score_tree(model, tokenizer, control, prompt_ids, Node.from_json(record["tree"]))
                row = {"key": record["key"], "alone": [round(s.alone, 4) for s in found],
                       "serial": [round(s.serial, 4) for s in found]}
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[record["key"]] = row
                seconds += time.perf_counter() - start
    kept, demoted, dependence = [], [], []
    for record in trees:
        row = done.get(record["key"])
        if row is None:
            continue
        found = [BranchScore(a, s) for a, s in zip(row["alone"], row["serial"])]
        dependence += [s.dependence for s in found]
        merged = merge_dependent(Node.from_json(record["tree"]), found, threshold)
        if len(merged.children) >= 2 or (merged.children and merged.depth() > 2):
            kept.append({**record, "tree": merged.to_json()})
        else:
            demoted.append({k: v for k, v in record.items() if k not in ("kind", "tree")})
    scored = [t for t in trees if t["key"] in done]
    write_jsonl(folder / "checked.jsonl", kept)
    write_jsonl(folder / "demoted.jsonl", demoted)
    dependence.sort()
    report = {
        "model": model_name,
        "threshold_nats_per_token": threshold,
        "scored_trees": len(scored),
        "of_trees": len(all_trees),
        "before": {"trees": len(scored), "branches": sum(_shape(t["tree"])[0] - 1 for t in scored)},
        "after": {"trees": len(kept), "branches": sum(_shape(t["tree"])[0] - 1 for t in kept)},
        "demoted_to_plain": len(demoted),
        "dependence_median": dependence[len(dependence) // 2] if dependence else 0.0,
        "dependence_p90": dependence[len(dependence) * 9 // 10] if dependence else 0.0,
        "trees_per_second_this_run": round(len(todo) / seconds, 3) if seconds else None,
    }
    (folder / "check.json").write_text(json.dumps(report, indent=2))
    return report
