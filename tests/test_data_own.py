"""Data v3: the model's own answers, cut into groups with joins, restoring token for token."""
import json

import pytest

from parafork import models
from parafork.data import own
from parafork.cli import main
from parafork.data.extract import JOIN, Node, extract_groups, rep4
from parafork.data.independence import reading_tokens
from parafork.data.samples import pack, tree_threads

LIST_THEN_CONCLUSION = """Here are some tips:

1. **Keep a schedule:** Go to bed at the same time every night, even on weekends.
2. **Limit screens:** Blue light from phones delays sleep; put them away early.
3. **Exercise daily:** Regular activity helps you fall asleep faster and sleep deeper.

By following these tips, you will sleep better and wake up rested."""

TWO_GROUPS = """Start with the basics:

1. **Budget:** Write down what you earn and what you spend every month.
2. **Savings:** Put a tenth of every pay cheque aside before spending.
3. **Debts:** Pay the most expensive debts first, then the cheaper ones.

Then think about the longer term:

- Retirement plan: start early, as compound interest does most of the work.
- Insurance cover: protect your home and income against the worst cases.
   1. Home insurance: covers fire, flood and theft of what you own.
   2. Income protection: pays part of your salary if you cannot work.
   3. Life insurance: looks after your family if the worst happens.
- Emergency fund: three to six months of costs, kept in easy reach.

In short, plan today and your future self will thank you."""

PROSE = """The sea is vast and deep. It covers most of the planet and holds countless forms of life.

Sailors have crossed it for millennia. They navigated by the stars before compasses existed.

Today it faces new threats. Pollution and warming waters change its ecosystems quickly.

In conclusion, the sea deserves our care. We should protect it for the generations to come."""


def _shape(root: Node) -> list:
    return ["C" if isinstance(s, Node) else "J" if s is JOIN else "t" for s in root.segments]


def test_text_after_a_list_is_written_after_a_join_straight_after_the_last_body():
    e = extract_groups(LIST_THEN_CONCLUSION)
    assert e.kind == "numbered" and e.root.text() == LIST_THEN_CONCLUSION
    assert _shape(e.root) == ["t", "C", "t", "C", "t", "C", "J", "t"]
    assert e.root.segments[-1] == "\n\nBy following these tips, you will sleep better and wake up rested."
    # Nothing after the list: no join.
    bare = LIST_THEN_CONCLUSION.rsplit("\n\n", 1)[0]
    assert JOIN not in extract_groups(bare).root.segments


def test_several_groups_each_joined_before_the_text_after_it_and_nested_lists_at_depth_three():
    e = extract_groups(TWO_GROUPS)
    assert e.kind == "numbered+bullets" and e.root.text() == TWO_GROUPS
    assert e.root.depth() == 3 and e.root.segments.count(JOIN) == 2
    shape = _shape(e.root)
    assert shape == ["t", "C", "t", "C", "t", "C", "J", "t", "C", "t", "C", "t", "C", "J", "t"]
    assert e.root.segments[7].startswith("\n\nThen think about the longer term:\n\n- Retirement plan:")
    insurance = e.root.children[4]
    assert len(insurance.children) == 3  # the nested list forks inside the item's body


def test_prose_forks_paragraphs_and_a_closing_summary_waits_for_them():
    e = extract_groups(PROSE)
    assert e.kind == "paragraphs" and len(e.root.children) == 3
    assert e.root.segments[-2] is JOIN and e.root.segments[-1].startswith("\n\nIn conclusion")
    assert e.root.segments[0] == "The sea is vast and deep."
    # A last paragraph that does not sum up forks like the others.
    plain_end = PROSE.replace("In conclusion, the sea", "Its future is in our hands, and the sea")
    assert len(extract_groups(plain_end).root.children) == 4 and JOIN not in extract_groups(plain_end).root.segments


def test_numbering_that_starts_again_is_a_new_group():
    again = LIST_THEN_CONCLUSION.replace("By following", "Also:\n\n1. **Stay cool:** A cool bedroom helps the body rest deeply.\n"
                                         "2. **Stay calm:** Breathe slowly for a minute before you sleep.\n"
                                         "3. **Stay dry:** Skip drinks in the last hour before bedtime.\n\nBy following")
    e = extract_groups(again)
    assert e.kind == "numbered+numbered" and e.root.segments.count(JOIN) == 2 and e.root.text() == again


def test_refusals_keep_their_reasons():
    assert extract_groups("Use this:\n```python\nprint(1)\n```").reason == "code"
    assert extract_groups("Just one short line.").reason == "no structure"


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return models.load_tokenizer(base_dir)[0]


@pytest.mark.parametrize("answer", [LIST_THEN_CONCLUSION, TWO_GROUPS, PROSE])
def test_cut_trees_restore_token_for_token_and_pack_with_joins(tokenizer, answer):
    ids = tokenizer.encode(answer, add_special_tokens=False)
    reason, e = own.cut({"answer": answer, "token_ids": ids, "finish_reason": "stop"}, tokenizer)
    assert reason == "ok" and reading_tokens(e.root, tokenizer) == ids
    control = models.register_control_tokens(tokenizer)
    threads = tree_threads([1, 2, 3], e.root, tokenizer, control)
    assert sum(len(t.joins) for t in threads) == e.root.segments.count(JOIN)
    pack(threads)  # the engine's join masks and positions


def test_cut_refuses_what_must_not_be_taught(tokenizer):
    ids = tokenizer.encode(PROSE, add_special_tokens=False)
    assert own.cut({"answer": PROSE, "token_ids": ids, "finish_reason": "length"}, tokenizer)[0] == "cut at max_tokens"
    loop = "I like the sea and the sky. " * 20
    assert own.cut({"answer": loop, "finish_reason": "stop"}, tokenizer)[0] == "loops"
    # The loop threshold is the caller's: an answer repeating a third of its 4-grams passes at 0.4.
    some = PROSE + "\n\n" + "\n\n".join(PROSE.split("\n\n")[:2])
    assert 0.2 < rep4(some) < 0.4
    assert own.cut({"answer": some, "finish_reason": "stop"}, tokenizer)[0] == "loops"
    assert own.cut({"answer": some, "finish_reason": "stop"}, tokenizer, max_rep4=0.4)[0] != "loops"
    # Tokens the model wrote that are not what the text encodes to: the tree would be taught other tokens.
    other = tokenizer.encode("The", add_special_tokens=False) + tokenizer.encode(" sea", add_special_tokens=False)
    odd = [tokenizer.convert_tokens_to_ids("T"), tokenizer.convert_tokens_to_ids("he")] + other[1:]
    assert tokenizer.decode(odd) == "The sea"
    assert own.cut({"answer": "The sea", "token_ids": odd, "finish_reason": "stop"}, tokenizer)[0] == \
        "not the tokenizer's own encoding"
    assert own.cut({"answer": "The sea", "token_ids": other, "finish_reason": "stop"}, tokenizer)[0] == "no structure"


def _sharegpt(tmp_path, n: int):
    convs = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"Give me some advice about topic number {i}."},
        {"from": "gpt", "value": LIST_THEN_CONCLUSION if i % 2 else f"Sure, topic {i} is simple."}]} for i in range(n)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    return path


def test_prompts_put_structured_ones_first_and_skip_refused_and_repeated(tmp_path):
    path = _sharegpt(tmp_path, 12)
    convs = json.loads(path.read_text())
    convs.append({"id": "dup", "conversations": convs[1]["conversations"]})  # the same prompt again
    convs.append({"id": "code", "conversations": [{"from": "human", "value": "Fix:\n```x = 1```"},
                                                  {"from": "gpt", "value": "ok"}]})
    path.write_text(json.dumps(convs))
    got = own.prompts(path)
    assert len(got) == 12 and "dup:0" not in {p["key"] for p in got} and "code:0" not in {p["key"] for p in got}
    kinds = [p["sharegpt_kind"] for p in got]
    assert kinds[:5].count(None) == 1 and kinds[:4].count(None) == 0  # four structured, then one other
    assert own.prompts(path) == got and "answer" not in got[0]


def test_own_answers_resume_without_repeats_and_refuse_changed_settings(tiny_dir, tmp_path):
    path = _sharegpt(tmp_path, 6)
    cfg = own.OwnAnswersConfig(out=str(tmp_path / "d"), count=2, input=str(path), model=str(tiny_dir),
                               max_tokens=12, concurrency=2, num_kv_blocks=64, dtype="float32")
    first = own.generate(cfg)
    assert first["answers"] == 2 and first["this_run"] == 2
    cfg.count = 5
    second = own.generate(cfg)
    assert second["this_run"] == 3 and second["answers"] == 5
    rows = [json.loads(line) for line in (tmp_path / "d" / "answers.jsonl").read_text().splitlines()]
    assert len({r["key"] for r in rows}) == 5
    assert all(len(r["token_ids"]) <= 12 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert own.generate(cfg)["this_run"] == 0  # nothing left to do
    record = json.loads((tmp_path / "d" / "generation.json").read_text())
    assert record["answers"]["max_tokens"] == 12 and len(record["runs"]) == 3
    cfg.max_tokens = 20
    with pytest.raises(ValueError, match="other settings"):
        own.generate(cfg)


def test_build_own_writes_trees_plain_and_join_statistics(tokenizer, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    answers = [
        {"key": "a:0", "context": [], "prompt": "tips?", "answer": LIST_THEN_CONCLUSION, "finish_reason": "stop",
         "token_ids": tokenizer.encode(LIST_THEN_CONCLUSION, add_special_tokens=False)},
        {"key": "b:0", "context": [], "prompt": "sea?", "answer": PROSE, "finish_reason": "length",
         "token_ids": tokenizer.encode(PROSE, add_special_tokens=False)},
        {"key": "c:0", "context": [], "prompt": "hi", "answer": "Hello there!", "finish_reason": "stop",
         "token_ids": tokenizer.encode("Hello there!", add_special_tokens=False)},
    ]
    (folder / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers) + '{"key": "cut mid-wri')
    stats = own.build_own(folder, sharegpt=_sharegpt(tmp_path, 8), tokenizer=tokenizer)
    assert stats["own"] == {"ok": 1, "cut at max_tokens": 1, "no structure": 1}
    assert stats["own_trees"] == 1 and stats["sharegpt_trees"] == 0  # a third of one tree is none
    trees = [json.loads(line) for line in (folder / "trees.jsonl").read_text().splitlines()]
    assert trees[0]["source"] == "own" and None in trees[0]["tree"]  # the join, as JSON null
    assert Node.from_json(trees[0]["tree"]).text() == LIST_THEN_CONCLUSION
    assert [json.loads(line)["key"] for line in (folder / "plain.jsonl").read_text().splitlines()] == ["c:0"]
    assert stats["trees_closing_with_text"] == 1 and stats["of_which_joined"] == 1
    assert (folder / "stats.png").exists() and stats["max_rep4"] == own.MAX_REP4
    with pytest.raises(ValueError, match="max_rep4"):
        own.build_own(folder, sharegpt=_sharegpt(tmp_path, 8), tokenizer=tokenizer, max_rep4=20)
    with pytest.raises(SystemExit, match="--max-rep4 applies with --own"):
        main(["data", "--out", str(folder), "--max-rep4", "0.3"])
    with pytest.raises(SystemExit, match="0..1"):
        main(["data", "--out", str(folder), "--own", "0", "--max-rep4", "20"])
