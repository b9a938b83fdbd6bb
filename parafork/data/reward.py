"""Scores of rollouts (model v4's data): quality gates first, then speed, capped and centred per prompt.

The reward must not be gamed (ThreadWeaver, arXiv 2512.07843; Parallel-R1, 2509.07980): ThreadWeaver gated its
speed bonus on correctness and capped it, and found that dividing advantages by their standard
deviation made the model chase speed; Parallel-R1 saw parallel use collapse once the reward stopped
paying for it; a tokens/s reward pays for padding. So:

- **Speed** is the answer's tokens over the decode steps of its critical path, from the tree
  itself (`critical_steps`: a child starts the step after its parent's `[Fork]`, the answer ends
  when its last thread does), not wall time: padding a branch does not shorten the critical path,
  and the same tokens written serially score 1.0. It is capped at `SPEED_CAP` (past it, the
  gates are what the model should learn) and centred per prompt over the samples that pass (no
  division by a spread).
- **Gates**, all required for any speed to be paid (`gates`): complete (every thread ended by
  itself, the request not cut at max_tokens); no loop (rep4 <= `MAX_REP4`); no repeated head
  (list items' in the text, and the line before each `[Fork]` in the tree: paragraph heads too); no stray control token in the restored text; no trivially short branch (each child
  writes >= `MIN_BRANCH_TOKENS`); length within `LENGTH_RANGE` of the same prompt's greedy AR
  answer; close in content to that AR answer (`similarity`, MiniLM cosine where the caller gives
  it, >= `MIN_SIMILARITY`). Branch independence (`data/independence.py`) needs a judging model
  per branch and is left to the training-set build, where only the chosen samples are judged.
- **Joins**: the model never samples `[Join]`; a closing paragraph after a group is joined when
  the chosen tree is turned into training data (as data v3 did), so no sample is paid for one here.

Weights: reward = min(speed, SPEED_CAP) - mean over the prompt's passing samples, for passing
samples; failing samples get `FAIL_REWARD` (below any passing one), so best-vs-worst pairs always
put a passing sample against a failing or slower one.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from ..rules import list_heads
from .extract import rep4

SPEED_CAP = 3.0  # answer tokens per critical-path step (the engine's best held-out samples reach ~2.6)
MAX_REP4 = 0.2
MIN_BRANCH_TOKENS = 8
LENGTH_RANGE = (0.85, 1.3)
MIN_SIMILARITY = 0.75
FAIL_REWARD = -1.0


def critical_steps(tree: dict, start: int = 0) -> int:
    """Decode steps until the last thread of `tree` (a rollout's token tree) has written its last
    token: the root's own token k comes at step k + 1; a child forked at its parent's own index i
    (the `[Fork]`, step start + i + 1) is fed its forced `[Child]` the next step, which gives its
    first sampled token, so its own token j (j >= 1) comes at step start + i + 1 + j."""
    end = start + len(tree["tokens"])
    for index, child in tree["children"].items():
        end = max(end, critical_steps(child, start + int(index)))
    return end


def _threads(tree: dict, depth: int = 0):
    yield tree, depth
    for child in tree["children"].values():
        yield from _threads(child, depth + 1)


def fork_heads(tree: dict, tokenizer, fork_id: int) -> list[str]:
    """The head each `[Fork]` follows (the last line its thread wrote before it, normalized as
    `rules.normalize_head`), over every thread: paragraph heads as well as list items'."""
    from ..rules import normalize_head

    heads, start = [], 0
    tokens = tree["tokens"]
    for i, token in enumerate(tokens):
        if token == fork_id:
            line = tokenizer.decode(tokens[start:i], skip_special_tokens=True).strip().split("\n")[-1]
            if normalize_head(line):
                heads.append(normalize_head(line))
            start = i + 1
    for child in tree["children"].values():
        heads += fork_heads(child, tokenizer, fork_id)
    return heads


@dataclass
class Score:
    speed: float  # answer tokens per critical-path step
    failed: list[str]  # the gates it failed (empty: passes)
    similarity: float | None = None
    reward: float = 0.0


def gates(sample: dict, reference: dict, text: str, reference_text: str, tokenizer, control,
          similarity=None) -> tuple[list[str], float | None]:
    """The gates `sample` fails against the prompt's greedy AR answer `reference` (module docstring)."""
    failed = []
    if sample["finish_reason"] != "stop":
        failed.append("cut")
    if (rep4(text) or 0.0) > MAX_REP4:
        failed.append("loops")
    heads, forked = list_heads(text), fork_heads(sample["tree"], tokenizer, control.fork_id)
    if len(heads) != len(set(heads)) or len(forked) != len(set(forked)):
        failed.append("repeated heads")
    if set(sample["token_ids"]) & {control.fork_id, control.child_id, control.join_id}:
        failed.append("stray control token")
    if any(depth and len(t["tokens"]) - 1 < MIN_BRANCH_TOKENS for t, depth in _threads(sample["tree"])):
        failed.append("short branch")
    ratio = len(sample["token_ids"]) / max(1, len(reference["token_ids"]))
    if not LENGTH_RANGE[0] <= ratio <= LENGTH_RANGE[1]:
        failed.append("length")
    sim = similarity(text, reference_text) if similarity is not None else None
    if sim is not None and sim < MIN_SIMILARITY:
        failed.append("content")
    return failed, sim


def score_prompt(row: dict, tokenizer, control, similarity: Callable[[str, str], float] | None = None) -> list[Score]:
    """Scores of every APAR sample of one prompt's rollouts (in their order), rewards centred
    over the prompt's passing samples."""
    reference = next(s for s in row["samples"] if s["kind"] == "ar_greedy")
    reference_text = tokenizer.decode(reference["token_ids"], skip_special_tokens=True)
    scores = []
    for sample in row["samples"]:
        if sample["kind"] != "apar":
            continue
        text = tokenizer.decode(sample["token_ids"], skip_special_tokens=True)
        failed, sim = gates(sample, reference, text, reference_text, tokenizer, control, similarity)
        speed = len(sample["token_ids"]) / max(1, critical_steps(sample["tree"]))
        scores.append(Score(speed, failed, sim))
    passing = [min(s.speed, SPEED_CAP) for s in scores if not s.failed]
    centre = statistics.fmean(passing) if passing else 0.0
    for s in scores:
        s.reward = min(s.speed, SPEED_CAP) - centre if not s.failed else FAIL_REWARD
    return scores


def score_folder(folder, tokenizer, control, similarity=None, pairs_path=None, num_pairs: int = 10) -> dict:
    """Scores every prompt's rollouts in `folder` into scores.jsonl (one line per prompt: each APAR
    sample's speed, failed gates, similarity, reward); with `pairs_path`, writes the `num_pairs`
    prompts with the widest best-vs-worst reward gap as a Markdown file of chosen and rejected
    answers (what preference training would see). Returns the summary."""
    import json
    from collections import Counter
    from pathlib import Path

    from tqdm.auto import tqdm

    from .rollouts import read

    rows = read(Path(folder))
    failed: Counter[str] = Counter()
    speeds, best, lines, gaps = [], [], [], []
    for row in tqdm(rows, desc="scores", unit=" prompt"):
        scores = score_prompt(row, tokenizer, control, similarity)
        lines.append({"key": row["key"], "scores": [s.__dict__ for s in scores]})
        for s in scores:
            failed.update(s.failed)
            speeds.append(s.speed)
        passing = [s.speed for s in scores if not s.failed]
        if passing:
            best.append(max(passing))
        ranked = sorted(range(len(scores)), key=lambda i: scores[i].reward)
        if passing and len(scores) > 1:
            gaps.append((scores[ranked[-1]].reward - scores[ranked[0]].reward, row, ranked[-1], ranked[0], scores))
    (Path(folder) / "scores.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = len(speeds)
    summary = {
        "prompts": len(rows), "samples": samples,
        "pass_rate": sum(1 for line in lines for s in line["scores"] if not s["failed"]) / max(1, samples),
        "failed": dict(failed.most_common()),
        "mean_speed": statistics.fmean(speeds) if speeds else None,
        "prompts_with_a_pass": len(best), "best_passing_speed_mean": statistics.fmean(best) if best else None,
        "gates": {"max_rep4": MAX_REP4, "min_branch_tokens": MIN_BRANCH_TOKENS, "length_range": LENGTH_RANGE,
                  "min_similarity": MIN_SIMILARITY if similarity else None, "speed_cap": SPEED_CAP},
    }
    if pairs_path:
        apar = lambda row: [s for s in row["samples"] if s["kind"] == "apar"]  # noqa: E731
        out = ["# Rollouts: chosen and rejected answers (the widest reward gaps)\n",
               f"From `{folder}`; scores and gates: `parafork/data/reward.py`.\n"]
        for gap, row, hi, lo, scores in sorted(gaps, key=lambda g: -g[0])[:num_pairs]:
            out.append(f"\n## {row['key']}: {row['prompt'][:200]!r}\n")
            for label, i in (("chosen", hi), ("rejected", lo)):
                s = scores[i]
                text = tokenizer.decode(apar(row)[i]["token_ids"], skip_special_tokens=True)
                out.append(f"\n**{label}** (speed {s.speed:.2f} tokens/step, reward {s.reward:+.2f}, "
                           f"failed: {', '.join(s.failed) or 'none'}):\n\n```\n{text}\n```\n")
        Path(pairs_path).parent.mkdir(parents=True, exist_ok=True)
        Path(pairs_path).write_text("".join(out))
    return summary


# A closing paragraph after a group is joined in the training tree (the model never samples
# `[Join]`): it then sees every branch, as data v3's trees taught. Only prose of some length.
MIN_JOINED_WORDS = 8


def node_of(tree: dict, tokenizer, control, root: bool = True):
    """A rollout's token tree as a training tree (`extract.Node`): each thread's text between its
    `[Fork]`s, the child born at each; `[Child]` and end tokens dropped; at the root, a `JOIN`
    before closing prose that follows the last child (`MIN_JOINED_WORDS`)."""
    from .extract import JOIN, Node

    segments, span = [], []
    children = {int(i): c for i, c in tree["children"].items()}
    skip = {control.child_id, control.join_id} | set(control.eos_ids)

    def flush() -> None:
        if span:
            segments.append(tokenizer.decode(span, skip_special_tokens=False))
            span.clear()

    for i, token in enumerate(tree["tokens"]):
        if token == control.fork_id and i in children:
            flush()
            segments.append(node_of(children[i], tokenizer, control, root=False))
        elif token not in skip:
            span.append(token)
    flush()
    if root and len(segments) >= 2 and isinstance(segments[-2], Node) and isinstance(segments[-1], str) \
            and segments[-1].startswith("\n") and len(segments[-1].split()) >= MIN_JOINED_WORDS:
        segments.insert(len(segments) - 1, JOIN)
    return Node(segments)


def build_sft(folder, out, tokenizer, control, similarity=None) -> dict:
    """Round 1's data (rejection-sampled SFT): per prompt, the passing APAR sample with the best
    reward as a tree (trees.jsonl), else, where none passes and the greedy AR answer is complete,
    that answer as a plain row (plain.jsonl: code, maths and short replies stay serial). A tree
    whose text pieces tokenize differently from the sample's own tokens is left out (training
    encodes the pieces as text). `parafork train --data OUT --init-adapter bundled` trains on it."""
    import json
    from collections import Counter
    from pathlib import Path

    from tqdm.auto import tqdm

    from .independence import reading_tokens
    from .rollouts import read

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trees, plain, why = [], [], Counter()
    keep = ("key", "context", "prompt")
    for row in tqdm(read(Path(folder)), desc="sft rows", unit=" prompt"):
        scores = score_prompt(row, tokenizer, control, similarity)
        apar = [s for s in row["samples"] if s["kind"] == "apar"]
        ranked = sorted((i for i, s in enumerate(scores) if not s.failed), key=lambda i: -scores[i].reward)
        chosen = None
        for i in ranked:
            node = node_of(apar[i]["tree"], tokenizer, control)
            if reading_tokens(node, tokenizer) == apar[i]["token_ids"]:
                chosen = (apar[i], node)
                break
            why["pieces tokenize differently"] += 1
        base = {k: row[k] for k in keep}
        if chosen is not None and chosen[1].children:
            sample, node = chosen
            trees.append({**base, "answer": node.text(), "source": "rollout", "kind": "rollout", "tree": node.to_json()})
            why["tree"] += 1
        else:
            greedy = next(s for s in row["samples"] if s["kind"] == "ar_greedy")
            if greedy["finish_reason"] == "stop":
                plain.append({**base, "answer": tokenizer.decode(greedy["token_ids"], skip_special_tokens=True),
                              "source": "rollout-ar"})
                why["plain (greedy AR)"] += 1
            else:
                why["nothing kept"] += 1
    for name, rows in (("trees.jsonl", trees), ("plain.jsonl", plain)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    stats = {"prompts": sum(why[k] for k in ("tree", "plain (greedy AR)", "nothing kept")), **why,
             "trees_with_join": sum(1 for t in trees if None in t["tree"])}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
