"""What a request asks of its answer, on the tiny model: stop strings on the restored text,
penalties per thread, the model's log-probabilities in reading order."""
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parafork import models
from parafork.engine.sampler import apply_penalties
from parafork.engine.thread import Request
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams
from parafork.tokens import ControlTokens

PROMPT = {"prompt_token_ids": list(range(700, 716))}


class ThreadLog:
    def __init__(self) -> None:
        self.threads = {}

    def __call__(self, thread, logits) -> None:
        self.threads[thread.thread_id] = thread


def forked_answer(llm, **params):
    log = ThreadLog()
    force = ForceForks(llm.control, frozenset({3, 8}), child_tokens=10, root_tokens=14)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=200, logits_rules=[log, force], **params))[0]
    return out, log


def child_text(llm, log) -> str:
    child = next(t for t in log.threads.values() if t.parent is not None)
    return llm.tokenizer.decode(child.own_tokens, skip_special_tokens=True)


def test_a_stop_string_inside_a_childs_body_ends_the_restored_text_there(tiny_llm):
    full, log = forked_answer(tiny_llm)
    assert full.num_threads == 3
    body = child_text(tiny_llm, log)
    stop = body[len(body) // 3 : len(body) // 3 + 6]
    index = full.text.find(stop)
    assert stop.strip() and 0 < index < len(full.text) - len(stop)
    out, _ = forked_answer(tiny_llm, stop=["never appears \x00", stop])
    assert out.text == full.text[:index] and out.finish_reason == "stop" and out.finished
    # Tokens (and logprobs, usage) keep what lies wholly before the stop: a token the stop begins in goes.
    kept = tiny_llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.text.startswith(kept) and len(out.text) - len(kept) < 16
    assert out.num_generated_tokens < full.num_generated_tokens  # it stopped early, not at the end
    tiny_llm.check_idle()


def test_streamed_deltas_never_show_text_a_stop_string_will_remove(tiny_llm):
    full, log = forked_answer(tiny_llm)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 7]
    index = full.text.find(stop)
    force = ForceForks(tiny_llm.control, frozenset({3, 8}), child_tokens=10, root_tokens=14)
    params = SamplingParams(max_tokens=200, logits_rules=[force], stop=stop)
    deltas, outs = [], []
    for out in tiny_llm.stream(PROMPT, params):
        deltas.append(out.delta)
        outs.append(out)
    assert "".join(deltas) == full.text[:index] == outs[-1].text
    assert outs[-1].finish_reason == "stop"
    tiny_llm.check_idle()


def test_stop_strings_are_validated():
    for bad in ("", [""], [3], ["ok", None]):
        with pytest.raises(ValueError, match="stop"):
            SamplingParams(stop=bad)
    assert SamplingParams(stop="x").stop == ("x",)


def _oracle(row: list[float], context: list[int], prompt_len: int, params: SamplingParams, ct: ControlTokens):
    """Penalties as specified, in plain Python over one thread's context."""
    row = list(row)
    control = set(ct.ids)
    if params.repetition_penalty != 1:
        for tok in set(context) - control:
            row[tok] = row[tok] / params.repetition_penalty if row[tok] > 0 else row[tok] * params.repetition_penalty
    answer = [t for t in context[prompt_len:] if t not in control]
    for tok in set(answer):
        row[tok] -= params.frequency_penalty * answer.count(tok) + params.presence_penalty
    return row


def test_penalties_change_logits_exactly_as_specified_and_ignore_siblings():
    ct = ControlTokens(fork_id=60, child_id=61, eos_ids=frozenset({0}), join_id=62)
    rng = random.Random(0)
    params = SamplingParams(frequency_penalty=0.7, presence_penalty=0.3, repetition_penalty=1.3)
    request = Request("r", [5, 6, 7, 5], params, 0)
    root = request.root
    root.token_ids += [8, 9, 8, ct.fork_id]
    first = request.fork(root, ct.child_id)
    first.token_ids += [10, 11, 10, 10]
    root.token_ids += [12, ct.fork_id]
    second = request.fork(root, ct.child_id)
    second.token_ids += [13, 8]
    threads = [root, first, second]
    logits = torch.tensor([[rng.uniform(-3, 3) for _ in range(64)] for _ in threads])
    expected = [_oracle(logits[i].tolist(), t.token_ids, 4, params, ct) for i, t in enumerate(threads)]
    apply_penalties(logits, threads, ct)
    for i, thread in enumerate(threads):
        assert logits[i].tolist() == pytest.approx(expected[i], abs=1e-5)
    # The second child never sees the first child's tokens (10, 11).
    untouched = torch.tensor([[1.0] * 64] * 3)
    apply_penalties(untouched, threads, ct)
    assert untouched[2, 10] == 1.0 and untouched[2, 11] == 1.0 and untouched[2, 13] < 1.0
    assert untouched[:, ct.fork_id].tolist() == [1.0] * 3  # forking is never penalized
    off = torch.tensor([[1.0] * 64])
    apply_penalties(off, [Request("s", [5], SamplingParams(), 0).root], ct)
    assert off.tolist() == [[1.0] * 64]


def test_penalties_change_the_answer_and_are_validated(tiny_llm):
    plain = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, mode="ar"))[0]
    penalized = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, mode="ar", frequency_penalty=2.0))[0]
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))  # fewer repeats
    for kwargs in ({"frequency_penalty": 3}, {"presence_penalty": -2.5}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SamplingParams(**kwargs)


def test_logprobs_of_greedy_tokens_equal_a_separate_forward(tiny_llm, tiny_dir):
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    out = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=12, mode="ar", logprobs=3))[0]
    ids = PROMPT["prompt_token_ids"] + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert len(out.logprobs) == len(out.token_ids) == 12
    for k, (token, (lp, top)) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(PROMPT["prompt_token_ids"]) - 1 + k]
        assert lp == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
    tiny_llm.check_idle()


def test_logprobs_follow_the_restored_tokens_in_reading_order(tiny_llm):
    out, _ = forked_answer(tiny_llm, logprobs=3)
    assert out.num_threads == 3 and len(out.logprobs) == len(out.token_ids)
    # Greedy: every restored token is its thread's argmax among the tokens the APAR rules allow
    # (the raw distribution may rank the banned [Fork]/[Child] higher), so it is the first such alternative.
    control = {tiny_llm.control.fork_id, tiny_llm.control.child_id}
    for token, (lp, top) in zip(out.token_ids, out.logprobs):
        allowed = [(t, v) for t, v in top if t not in control]
        assert allowed[0] == (token, lp)
    assert forked_answer(tiny_llm)[0].logprobs is None


def _cut_children(llm, forks, child_tokens, root_tokens, max_tokens, plan_budget=True):
    log = ThreadLog()
    force = ForceForks(llm.control, frozenset(forks), child_tokens=child_tokens, root_tokens=root_tokens)
    params = SamplingParams(max_tokens=max_tokens, logits_rules=[log, force], plan_budget=plan_budget, max_threads=64)
    out = llm.generate(PROMPT, params)[0]
    request = next(iter(log.threads.values())).request
    cut = [t for t in request.threads if t.parent is not None and t.finish_reason.value != "stop"]
    return out, cut


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    forks=st.sets(st.integers(1, 30), max_size=8),
    child_tokens=st.integers(1, 37),  # own tokens [Child] + body + end <= the default expected body (40)
    root_tokens=st.integers(4, 60),
    max_tokens=st.integers(10, 250),
)
def test_with_budget_planning_no_body_is_cut_inside_the_answer(tiny_llm, forks, child_tokens, root_tokens, max_tokens):
    """Bodies no longer than expected always finish: if the budget runs out, only the root is
    cut, at the end of the restored text."""
    out, cut = _cut_children(tiny_llm, forks, child_tokens, root_tokens, max_tokens)
    assert not cut
    assert out.num_generated_tokens <= max_tokens
    tiny_llm.check_idle()


def test_without_budget_planning_the_same_request_cuts_bodies_mid_answer(tiny_llm):
    case = dict(forks={2, 4, 6, 8}, child_tokens=30, root_tokens=12, max_tokens=70)
    out, cut = _cut_children(tiny_llm, plan_budget=False, **case)
    assert cut and out.finish_reason == "length"
    planned, cut = _cut_children(tiny_llm, **case)
    assert not cut and planned.num_threads < out.num_threads  # fewer forks, all of them finished


def test_a_forking_thread_cannot_repeat_an_earlier_items_head(tiny_llm):
    from parafork.rules import NoRepeatedHeads, list_heads

    tok, ct = tiny_llm.tokenizer, tiny_llm.control
    guard = NoRepeatedHeads(ct, tok)
    request = Request("r", [1, 2, 3], SamplingParams(), 0)
    root = request.root

    def write(text: str, fork: bool = False) -> None:
        root.token_ids.extend(tok.encode(text, add_special_tokens=False) + ([ct.fork_id] if fork else []))
        if fork:
            request.fork(root, ct.child_id)

    def banned() -> list[int]:
        logits = torch.zeros(len(tok))
        guard(root, logits)
        return torch.nonzero(logits == float("-inf")).flatten().tolist()

    write("Tips:\n1. Get enough sleep:", fork=True)
    write("\n2. **Seek help**:", fork=True)
    write("\n3. Get")
    assert banned() == [tok.encode(" enough sleep", add_special_tokens=False)[0]]
    write(" regular")  # sharing a first word is fine, and nothing earlier starts "Get regular"
    assert banned() == []
    write(" exercise:", fork=True)
    write("\n4. Seek")
    assert banned() == [tok.encode(" help", add_special_tokens=False)[0]]
    write(" help")  # now equal to an earlier head: what would end it is banned, not what goes on
    ends = banned()
    assert tok.encode(":", add_special_tokens=False)[0] in ends and tok.encode(".", add_special_tokens=False)[0] in ends
    assert tok.encode(" and", add_special_tokens=False)[0] not in ends
    write(" from friends:", fork=True)
    child = request.threads[1]
    child.token_ids.extend(tok.encode(" Aim for eight hours.", add_special_tokens=False))
    logits = torch.zeros(len(tok))
    guard(child, logits)  # a body is not a head
    assert not torch.isinf(logits).any()
    # A body that reaches a line break and would start the next item ends instead.
    child.token_ids.extend(tok.encode("\n", add_special_tokens=False))
    logits = torch.zeros(len(tok))
    logits[tok.encode("2", add_special_tokens=False)[0]] = 5.0
    guard(child, logits)
    assert int(logits.argmax()) in ct.eos_ids and torch.isinf(logits).sum() == len(tok) - 1
    # A child that starts with a line break may not open the next item instead of its body.
    fresh = Request("s", [1, 2, 3], SamplingParams(), 0)
    fresh.root.token_ids.extend(tok.encode("Tips:\n1. Customer reviews:", add_special_tokens=False) + [ct.fork_id])
    early = fresh.fork(fresh.root, ct.child_id)
    early.token_ids.extend(tok.encode("\n", add_special_tokens=False))
    logits = torch.zeros(len(tok))
    logits[tok.encode("2", add_special_tokens=False)[0]] = 5.0
    guard(early, logits)
    assert torch.isinf(logits[tok.encode("2", add_special_tokens=False)[0]]) and not torch.isinf(logits[min(ct.eos_ids)])
    assert not torch.isinf(logits[tok.encode("The", add_special_tokens=False)[0]])
    # A child writing an item line of its own may not repeat a head it sees in its ancestors' text.
    child.token_ids.extend(tok.encode("- Get", add_special_tokens=False))
    logits = torch.zeros(len(tok))
    guard(child, logits)
    assert torch.nonzero(logits == float("-inf")).flatten().tolist() == [tok.encode(" enough sleep", add_special_tokens=False)[0]]
    assert list_heads("1. **Get enough sleep**: a\n2. Seek help. b\n- get  enough sleep!") == [
        "get enough sleep", "seek help", "get enough sleep"]


def test_a_parent_without_budget_for_another_body_does_not_open_a_new_item(tiny_llm):
    from parafork.rules import NoRepeatedHeads

    tok, ct = tiny_llm.tokenizer, tiny_llm.control
    guard = NoRepeatedHeads(ct, tok)
    for max_tokens, closes in ((40, True), (400, False)):
        request = Request("r", [1, 2, 3], SamplingParams(max_tokens=max_tokens), 0)
        root = request.root
        root.token_ids.extend(tok.encode("Tips:\n1. Sleep well:", add_special_tokens=False) + [ct.fork_id])
        request.fork(root, ct.child_id)
        request.num_generated = 12
        root.token_ids.extend(tok.encode("\n", add_special_tokens=False))
        two = tok.encode("2", add_special_tokens=False)[0]
        for indent in ("", "    "):  # an indented bullet opens an item too
            root.token_ids.extend(tok.encode(indent, add_special_tokens=False))
            logits = torch.zeros(len(tok))
            guard(root, logits)
            assert bool(torch.isinf(logits[two])) == closes
        assert not torch.isinf(logits[min(ct.eos_ids)])  # it may always end


def test_unset_penalties_take_the_models_defaults(tiny_dir, tmp_path):
    """A penalty left at None comes from the model's (or its adapter's) generation_config.json,
    as in vLLM; explicit values, 0 included, win; a model that names none decodes unpenalized."""
    import json
    import shutil

    from parafork.llm import LLM

    folder = tmp_path / "tiny-with-defaults"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "frequency_penalty": 2.0}))
    llm = LLM(str(folder), dtype="float32", num_kv_blocks=256, block_size=4)
    assert llm.sampling_defaults == {"frequency_penalty": 2.0}
    default, chosen, off = (
        llm.generate(PROMPT, SamplingParams(max_tokens=30, mode="ar", **kwargs))[0].token_ids
        for kwargs in ({}, {"frequency_penalty": 2.0}, {"frequency_penalty": 0.0})
    )
    assert default == chosen != off
    plain = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4)
    assert plain.sampling_defaults == {}
    assert plain.generate(PROMPT, SamplingParams(max_tokens=30, mode="ar"))[0].token_ids == off
    llm.check_idle()
    # The facade holds the engine and cannot skip its policy: a request added to the engine
    # itself gets the model's defaults and the head guard, exactly once.
    from parafork.engine.engine import Engine
    from parafork.rules import NoRepeatedHeads

    assert not isinstance(llm, Engine) and isinstance(llm.engine, Engine)
    llm.engine.add("direct", llm.encode(PROMPT), SamplingParams(max_tokens=4, mode="apar"))
    params = llm.engine.requests["direct"].params
    assert params.frequency_penalty == 2.0
    assert [r for r in params.logits_rules if isinstance(r, NoRepeatedHeads)] == [llm.engine.head_guard]
    llm.engine.abort("direct")
    rid = llm.add_request(PROMPT, SamplingParams(max_tokens=4, mode="apar", frequency_penalty=0.5))
    params = llm.engine.requests[rid].params
    assert params.frequency_penalty == 0.5 and sum(isinstance(r, NoRepeatedHeads) for r in params.logits_rules) == 1
    llm.abort(rid)
    llm.check_idle()


def test_sampling_defaults_prefer_the_adapter_and_are_validated(tmp_path):
    import json

    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir(), adapter.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.2, "eos_token_id": 2}))
    assert models.sampling_defaults(model) == {"repetition_penalty": 1.2}
    assert models.sampling_defaults(model, adapter) == {"repetition_penalty": 1.2}  # the adapter names none
    (adapter / "generation_config.json").write_text(json.dumps({"frequency_penalty": 0.2}))
    assert models.sampling_defaults(model, adapter) == {"frequency_penalty": 0.2}
    (adapter / "generation_config.json").write_text(json.dumps({"presence_penalty": 5}))
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        models.sampling_defaults(model, adapter)
    assert SamplingParams(presence_penalty=None).with_defaults({"presence_penalty": 0.5}).presence_penalty == 0.5
    assert SamplingParams(presence_penalty=0.0).with_defaults({"presence_penalty": 0.5}).presence_penalty == 0.0
    assert SamplingParams().with_defaults().repetition_penalty == 1.0
    # Thread levels too: a model trained on nested lists (v3) asks for 3; a request's own value wins.
    (adapter / "generation_config.json").write_text(json.dumps({"max_depth": 3, "join": True}))
    defaults = models.sampling_defaults(model, adapter)
    assert defaults == {"max_depth": 3, "join": True}
    assert SamplingParams().with_defaults(defaults).max_depth == 3 and SamplingParams().with_defaults().max_depth == 2
    assert SamplingParams(max_depth=2).with_defaults(defaults).max_depth == 2
    for bad in (0, 9, 2.5, True):
        (adapter / "generation_config.json").write_text(json.dumps({"max_depth": bad}))
        with pytest.raises(ValueError, match="max_depth must be an integer in"):
            models.sampling_defaults(model, adapter)
        with pytest.raises(ValueError, match="max_depth must be an integer in"):
            SamplingParams(max_depth=bad)


def test_the_head_guards_newline_set_says_what_decoding_says(tiny_llm):
    """The guard skips its decode when no token of the tail holds a line break; that set test
    must agree with decoding the tail, for any tokens (byte-level pieces, specials included)."""
    import random

    from parafork.rules import NoRepeatedHeads

    tok = tiny_llm.tokenizer
    guard = NoRepeatedHeads(tiny_llm.control, tok)
    guard._token_texts()
    newline = sorted(guard._newline_ids)
    assert newline and tok.encode("a\nb", add_special_tokens=False)[1] in guard._newline_ids
    rng = random.Random(0)
    for _ in range(300):
        window = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 32))]
        if rng.random() < 0.3:
            window[rng.randrange(len(window))] = rng.choice(newline)
        decoded = "\n" in tok.decode(window, skip_special_tokens=True)
        assert decoded == (not guard._newline_ids.isdisjoint(window)), window
