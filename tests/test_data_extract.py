"""Extraction rules and filters on hand-written answers; trees always read back exactly."""
import json

import pytest

from parafork.data.extract import Node, extract
from parafork.data.sharegpt import first_turns, iter_conversations

NUMBERED_BOLD = """Here are some tips:

1. **Keep a schedule:** Go to bed at the same time every night, even on weekends.
2. **Limit screens:** Blue light from phones delays sleep; put them away early.
3. **Exercise daily:** Regular activity helps you fall asleep faster and sleep deeper.

Sleep well!"""

NESTED = """Tips:

1. Eat a good diet: Eat well and often, with plenty of vegetables.
   - Vegetables daily: at least five portions every day.
   - Fruit in moderation: two portions, whole rather than juiced.
   - Water all day: drink it through the day, not all at once.
2. Sleep regularly: Keep regular hours, including weekends.
3. Move every day: Walk or cycle for thirty minutes daily."""

BULLETS = """Consider these:

- Public transport: cheaper than a car and you can read on the way.
- Cycling to work: free exercise twice a day, rain or shine.
- Working from home: no commute at all, if your job allows it."""

PARAGRAPHS = """The sea is vast and deep. It covers most of the planet and holds countless forms of life.

Sailors have crossed it for millennia. They navigated by the stars before compasses existed.

Today it faces new threats. Pollution and warming waters change its ecosystems quickly."""


def test_numbered_list_with_bold_titles():
    e = extract(NUMBERED_BOLD)
    assert e.kind == "numbered"
    assert e.root.to_json() == [
        "Here are some tips:\n\n1. **Keep a schedule:**",
        [" Go to bed at the same time every night, even on weekends."],
        "\n2. **Limit screens:**",
        [" Blue light from phones delays sleep; put them away early."],
        "\n3. **Exercise daily:**",
        [" Regular activity helps you fall asleep faster and sleep deeper."],
        "\n\nSleep well!",
    ]


def test_nested_list_becomes_a_depth_three_tree():
    e = extract(NESTED)
    assert e.kind == "numbered" and e.root.depth() == 3 and e.root.num_threads() == 7
    assert e.root.text() == NESTED


def test_bullets_and_paragraphs():
    assert extract(BULLETS).kind == "bullets" and len(extract(BULLETS).root.children) == 3
    e = extract(PARAGRAPHS)
    assert e.kind == "paragraphs"
    assert [c.text() for c in e.root.children][0] == " It covers most of the planet and holds countless forms of life."


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("Use this:\n```python\nprint(1)\n```\n1. a: b", "code"),
        ("The formula $$x^2$$ holds.", "maths"),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "table"),
        ("See https://example.com for more.", "url"),
        ("Use <b>bold</b> text.", "html"),
        ("这是中文", "cjk"),
        ("Just one short line.", "no structure"),
    ],
)
def test_filters_reject_with_a_reason(answer, reason):
    e = extract(answer)
    assert e.kind is None and e.reason == reason


def test_too_few_items_short_pieces_and_broken_numbering_are_rejected():
    two = "1. **First item here:** details long enough.\n2. **Second item here:** details long enough."
    assert extract(two).kind is None
    short = NUMBERED_BOLD.replace("Blue light from phones delays sleep; put them away early.", "No.")
    assert extract(short).kind is None
    skipped = NUMBERED_BOLD.replace("3. **Exercise", "5. **Exercise")
    assert extract(skipped).kind != "numbered"


def test_tree_json_round_trip():
    root = extract(NESTED).root
    assert Node.from_json(json.loads(json.dumps(root.to_json()))) == root


def test_truncated_sharegpt_file_keeps_every_whole_conversation(tmp_path):
    convs = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(3)
    ]
    text = json.dumps(convs, indent=2)
    cut = text[: text.index('"2"') + 10]  # the file ends inside the third conversation
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    got = list(iter_conversations(path))
    assert [c["id"] for c in got] == ["0", "1"]
    assert first_turns(got[1]) == ("q1", "a1")
    assert first_turns({"conversations": [{"from": "gpt", "value": "x"}]}) is None
