"""Extraction rules and filters on hand-written answers; trees always read back exactly."""
import json

import pytest

from parafork.data.extract import Node, extract
from parafork.data.sharegpt import exchanges, iter_conversations, messages

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


def test_a_tab_indented_nested_list_keeps_its_tabs():
    tabbed = NESTED.replace("\n   - ", "\n\t* ")
    e = extract(tabbed)
    assert e.kind == "numbered" and e.root.depth() == 3 and e.root.text() == tabbed


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
    assert [(e["prompt"], e["answer"]) for e in exchanges(got[1])] == [("q1", "a1")]
    assert list(exchanges({"conversations": [{"from": "gpt", "value": "x"}]})) == []


def _turns(*values):
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]}


def test_every_assistant_turn_is_an_exchange_with_the_chat_before_it_as_context():
    conv = _turns("q0", "a0", "q1", "a1", "q2", "a2")
    got = list(exchanges(conv))
    assert [(e["turn"], e["prompt"], e["answer"]) for e in got] == [(0, "q0", "a0"), (1, "q1", "a1"), (2, "q2", "a2")]
    assert got[0]["context"] == []
    assert got[2]["context"] == [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
    ]
    assert messages(got[2])[-1] == {"role": "user", "content": "q2"} and len(messages(got[2])) == 5
    assert messages({"prompt": "v1 record"}) == [{"role": "user", "content": "v1 record"}]  # v1 data has no context


def test_context_keeps_the_newest_whole_exchanges_that_fit():
    conv = _turns("q" * 10, "a" * 50, "Q" * 10, "A" * 20, "last", "answer")
    last = list(exchanges(conv, max_context_chars=40))[-1]
    assert [m["content"] for m in last["context"]] == ["Q" * 10, "A" * 20]  # 30 chars fit, 60 more do not
    assert list(exchanges(conv, max_context_chars=10))[-1]["context"] == []  # always starts with a user turn
    # A turn out of order (or not text) ends the conversation there.
    broken = {"conversations": _turns("q0", "a0")["conversations"] + [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}
    assert len(list(exchanges(broken))) == 1
    assert list(exchanges(_turns("q0", "", "q1", "a1"))) == []


SENTENCE_HEADS = """Try these:

1. Go to bed at the same time every night. Your body clock learns the rhythm and sleep comes sooner.
2. Keep the bedroom cool and dark. A cool room helps the body drop its temperature for deep sleep.
3. **Avoid caffeine late:** coffee after lunch can keep you awake for hours.

Good night!"""


def test_numbered_items_with_a_plain_first_sentence_as_head():
    e = extract(SENTENCE_HEADS)
    assert e.kind == "numbered-sentence" and e.root.text() == SENTENCE_HEADS
    assert [c.text() for c in e.root.children][:2] == [
        " Your body clock learns the rhythm and sleep comes sooner.",
        " A cool room helps the body drop its temperature for deep sleep.",
    ]
    assert e.root.segments[0].endswith("1. Go to bed at the same time every night.")
    # Bullets need a bold or colon head; a one-sentence item has no body to fork.
    assert extract(SENTENCE_HEADS.replace("1.", "-").replace("2.", "-").replace("3.", "-")).kind != "bullets"
    one_sentence = "Steps:\n\n1. Open the door and walk in.\n2. Close the door behind you.\n3. Sit down and rest."
    assert extract(one_sentence).kind == "paragraphs" or extract(one_sentence).root is None
