"""`parafork bench ceiling`: decode steps of an answer cut by a data recipe, against an
independent step-by-step simulation of threads writing one token per step."""
import json
from types import SimpleNamespace

import pytest

from parafork import models
from parafork.bench import ceiling
from parafork.data.extract import JOIN, Node

ANSWER = (
    "Here are three habits that help most people sleep better at night:\n\n"
    "1. **Keep a schedule**: Go to bed and wake up at the same time every day, weekends included, so your body clock stays steady.\n"
    "2. **Cut caffeine late**: Avoid coffee, tea and cola after lunch, since caffeine stays in the blood for many hours.\n"
    "3. **Dim the screens**: Put phones and laptops away an hour before bed, because bright light tells the brain it is daytime.\n\n"
    "Together these small changes add up, and most people notice deeper sleep within two weeks."
)


@pytest.fixture(scope="module")
def tok(base_dir):
    return models.load_tokenizer(base_dir)


def oracle_steps(root: Node, tokenizer) -> int:
    """The root writes from step 1 on (the prompt is step 0)."""
    return simulate(root, tokenizer, 1)[1]


def simulate(node: Node, tokenizer, start: int) -> tuple[int, int]:
    """Oracle: the thread writing `node`'s text from step `start` on, one token per step. A
    [Fork] takes a step; the child writes [Child] on the next step and its text after it; a
    [Join] comes on the step after the later of the thread's last token and the joined
    children's last text tokens (their end tokens fall on the [Join]'s step). Returns (the
    step of the thread's last text token, the last step any of its threads uses)."""
    step, last_any, unjoined = start - 1, start - 1, []
    for segment in node.segments:
        if isinstance(segment, str):
            step += len(tokenizer.encode(segment, add_special_tokens=False))
        elif segment is JOIN:
            step = max([step] + unjoined) + 1
            unjoined = []
        else:
            step += 1  # [Fork]
            # the child's [Child] on the next step, its text after it
            body_end, child_any = simulate(segment, tokenizer, step + 2)
            body_end = max(body_end, step + 1)
            unjoined.append(body_end)
            last_any = max(last_any, child_any)
    return step, max(last_any, step + 1)


@pytest.mark.parametrize("recipe", ["v2", "v3", "v3-nojoin", "v3-nojoin-h4"])
def test_steps_match_a_thread_by_thread_simulation(tok, recipe):
    tokenizer, control = tok
    root = ceiling.tree(ANSWER, recipe, tokenizer)
    assert root.text() == ANSWER and root.num_threads() == 4  # three items fork in every recipe
    assert (root.num_joins() == 1) == (recipe == "v3")  # v3 joins before the closing paragraph
    assert ceiling.decode_steps(root, tokenizer, control) == oracle_steps(root, tokenizer)


def test_an_answer_without_structure_takes_one_step_per_token_and_its_end(tok):
    tokenizer, control = tok
    text = "Paris is the capital of France."
    n = len(tokenizer.encode(text, add_special_tokens=False))
    for recipe in ("v2", "v3"):
        root = ceiling.tree(text, recipe, tokenizer)
        assert root.num_threads() == 1 and ceiling.decode_steps(root, tokenizer, control) == n + 1


def test_joins_and_long_heads_cost_steps_and_shorter_heads_give_them_back(tok):
    tokenizer, control = tok
    steps = {r: ceiling.decode_steps(ceiling.tree(ANSWER, r, tokenizer), tokenizer, control)
             for r in ("v3", "v3-nojoin", "v3-nojoin-h4")}
    n = len(tokenizer.encode(ANSWER, add_special_tokens=False))
    assert steps["v3"] > steps["v3-nojoin"] > steps["v3-nojoin-h4"] and steps["v3"] < n
    # Heads of at most 4 tokens, cut at a word: "1. **Keep a schedule**:" keeps "1. **Keep".
    short = ceiling.tree(ANSWER, "v3-nojoin-h4", tokenizer)
    heads = [s for s in short.segments if isinstance(s, str)]
    assert all(len(tokenizer.encode(h.rsplit("\n", 1)[-1], add_special_tokens=False)) <= 4 for h in heads[:3] if h.strip())


def test_the_bench_reads_bench_and_data_files_and_refuses_what_it_cannot_read(base_dir, tmp_path):
    bench = tmp_path / "latency.json"
    bench.write_text(json.dumps({"questions": [
        {"id": 1, "category": "generic", "modes": {"ar": {"text": ANSWER}, "apar": {"text": ANSWER, "tokens": 90, "steps": 45}}},
        {"id": 2, "category": "math", "modes": {"ar": {"text": "It is 4."}, "apar": {"text": "It is 4.", "tokens": 5, "steps": 6}}},
    ]}))
    args = SimpleNamespace(model=str(base_dir), answers=str(bench), mode=None, recipes="v2,v3", head_tokens="8",
                           json=str(tmp_path / "c.json"), plot=str(tmp_path / "c.png"))
    result = ceiling.run(args)
    assert result["recipes"] == ["v2", "v3", "v3-nojoin-h8"] and result["config"]["mode"] == "ar"
    assert result["per_category"]["generic"]["v3"]["fork_rate"] == 1 and result["per_category"]["math"]["v2"]["fork_rate"] == 0
    assert result["all"]["measured_apar"] == pytest.approx(95 / 51)
    assert result["all"]["v2"]["ceiling"] > 1 and (tmp_path / "c.png").stat().st_size > 0
    data = tmp_path / "answers.jsonl"
    data.write_text(json.dumps({"answer": ANSWER, "source": "own"}) + "\n")
    got = ceiling.run(SimpleNamespace(**{**vars(args), "answers": str(data), "head_tokens": None, "plot": None}))
    assert list(got["per_category"]) == ["own"] and "measured_apar" not in got["all"]
    with pytest.raises(ValueError, match="no 'serial' answers"):
        ceiling.run(SimpleNamespace(**{**vars(args), "mode": "serial"}))
    with pytest.raises(ValueError, match="--mode is for bench JSONs"):
        ceiling.run(SimpleNamespace(**{**vars(args), "answers": str(data), "mode": "ar"}))
    with pytest.raises(ValueError, match="--recipes takes"):
        ceiling.run(SimpleNamespace(**{**vars(args), "recipes": "v4"}))
