"""`parafork data`: ShareGPT first turns -> paragraph trees (JSONL), statistics and a histogram.

Answers with no structure that pass the filters are kept apart as plain samples, so
training can mix them in (the model must keep writing plain answers where nothing forks).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from .extract import Node, extract
from .independence import DEFAULT_THRESHOLD, merge_dependent, score_tree
from .sharegpt import first_turns, iter_conversations, packaged_sharegpt_path


def build(
    input_path: Path | None,
    out_dir: Path,
    limit: int | None = None,
    seed: int = 0,
    check_model: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict:
    """Extracts trees; with `check_model`, that model judges each branch's independence
    and dependent branches are merged back (see `independence.py`)."""
    path = Path(input_path) if input_path else packaged_sharegpt_path()
    out_dir.mkdir(parents=True, exist_ok=True)
    trees, plain = [], []
    reasons: Counter[str] = Counter()
    seen = 0
    for conv in tqdm(iter_conversations(path), desc="extract", unit=" conv"):
        pair = first_turns(conv)
        if pair is None:
            reasons["not a human/gpt first turn"] += 1
            continue
        seen += 1
        prompt, answer = pair
        e = extract(answer)
        reasons[e.reason] += 1
        record = {"id": conv.get("id"), "prompt": prompt, "answer": answer}
        if e.root is not None:
            trees.append({**record, "kind": e.kind, "tree": e.root.to_json()})
        elif e.reason == "no structure":
            plain.append(record)
        if limit and len(trees) >= limit:
            break
    random.Random(seed).shuffle(trees)
    random.Random(seed).shuffle(plain)
    check = check_independence(trees, plain, check_model, threshold) if check_model else None
    for name, rows in (("trees.jsonl", trees), ("plain.jsonl", plain)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats = _stats(trees, plain, reasons, seen, path)
    if check:
        stats["independence"] = check
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    _histogram(trees, out_dir / "branches.png")
    return stats


def check_independence(trees: list[dict], plain: list[dict], model_name: str, threshold: float) -> dict:
    """Scores every branch, merges dependent ones back, moves trees left with < 2 branches to
    the plain answers (in place). Returns the counts before and after."""
    import torch

    from .. import models

    path = models.resolve_model_path(model_name)
    tokenizer, control = models.load_tokenizer(path)
    model = models.load_hf_model(path, tokenizer, torch.float32)
    before = {"trees": len(trees), "branches": sum(_count(t["tree"])[0] - 1 for t in trees)}
    kept, dependence = [], []
    for record in tqdm(trees, desc="independence", unit=" tree"):
        root = Node.from_json(record["tree"])
        scores = score_tree(model, tokenizer, control, models.apply_chat_template(tokenizer, record["prompt"]), root)
        dependence += [s.dependence for s in scores]
        merged = merge_dependent(root, scores, threshold)
        if len(merged.children) >= 2 or (merged.children and merged.depth() > 2):
            kept.append({**record, "tree": merged.to_json(), "dependence": [round(s.dependence, 3) for s in scores]})
        else:
            plain.append({k: record[k] for k in ("id", "prompt", "answer")})
    trees[:] = kept
    dependence.sort()
    return {
        "model": model_name,
        "threshold_nats_per_token": threshold,
        "before": before,
        "after": {"trees": len(trees), "branches": sum(_count(t["tree"])[0] - 1 for t in trees)},
        "dependence_median": dependence[len(dependence) // 2] if dependence else 0.0,
        "dependence_p90": dependence[int(len(dependence) * 0.9)] if dependence else 0.0,
    }


def _count(tree: list) -> tuple[int, int]:
    """(threads, depth) of a tree in JSON form."""
    kids = [_count(s) for s in tree if isinstance(s, list)]
    return 1 + sum(k[0] for k in kids), 1 + max((k[1] for k in kids), default=0)


def _stats(trees: list[dict], plain: list[dict], reasons: Counter, seen: int, path: Path) -> dict:
    threads = [_count(t["tree"])[0] for t in trees]
    depths = Counter(_count(t["tree"])[1] for t in trees)
    lengths = sorted(len(t["answer"]) for t in trees)
    return {
        "source": str(path),
        "first_turns": seen,
        "trees": len(trees),
        "plain": len(plain),
        "kinds": dict(Counter(t["kind"] for t in trees)),
        "rejected": dict(reasons),
        "threads_mean": sum(threads) / max(len(threads), 1),
        "depths": {str(k): v for k, v in sorted(depths.items())},
        "answer_chars_median": lengths[len(lengths) // 2] if lengths else 0,
    }


def _histogram(trees: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = [_count(t["tree"])[0] - 1 for t in trees]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(threads, bins=range(0, max(threads, default=1) + 2), color="#4a7", edgecolor="white")
    ax.set_xlabel("branches (child threads) per tree")
    ax.set_ylabel("trees")
    ax.set_title(f"{len(trees)} paragraph trees")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
