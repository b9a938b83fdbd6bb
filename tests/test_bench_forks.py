"""Fork statistics over a question suite: loading, validation and the summary figures."""
import json

import pytest

from parafork.bench.forks import evaluate, load_suite, numbering_intact


def test_vicuna_suite_loads_and_bad_files_are_refused(tmp_path):
    questions = load_suite("vicuna")
    assert len(questions) == 80 and {q["category"] for q in questions} >= {"generic", "coding", "math"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"oops": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_suite(bad)
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "missing.jsonl")


def test_numbering_check():
    assert numbering_intact("1. a\n2. b\n3. c\n\nThen:\n1. x\n2. y")
    assert not numbering_intact("1. a\n3. b")
    assert numbering_intact("no list at all")


def test_summary_counts_what_the_engine_reports(tiny_llm, tmp_path):
    questions = [{"id": i, "category": c, "prompt": f"question {i}"} for i, c in enumerate(["generic", "coding"])]
    result = evaluate(tiny_llm, questions, max_tokens=12, with_ar=True)
    rows = result["per_category"]
    assert rows["all"]["answers"] == 2 and rows["forking categories"]["answers"] == 1
    for rec in result["questions"]:
        assert rec["threads"] == 1 and rec["steps"] == rec["ar_steps"]  # the tiny model never forks
    assert rows["all"]["fork_rate"] == 0 and rows["all"]["ar_vs_apar_steps"] == 1.0
    json.dumps(result)
