"""APAR on real vLLM: the rules plugin (no vLLM needed), then the driver against `vllm serve`
started on loopback from `.venv-vllm` (`make vllm`) with the bundled model merged.

Where vLLM cannot run (no venv, or it does not import on this CPU), the server tests skip with
the reason (`pytest -rs` prints it; `make test` passes -rs)."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import torch

from parafork import models
from parafork.sampling import SamplingParams
from parafork.tokens import ControlTokens
from parafork.vllm.driver import VLLMDriver, driver_params
from parafork.vllm.plugin import thread_rules

CONTROL = ControlTokens(fork_id=10, child_id=11, eos_ids=frozenset({2}), join_id=12)
PROMPT = "Give me three tips for sleeping well."  # the bundled model forks it: 4 threads, 138 tokens


def xargs(**kw):
    base = {"apar_fork_id": 10, "apar_child_id": 11, "apar_join_id": 12, "apar_eos_id": 2, "apar_answer_start": 3,
            "apar_own_start": 3, "apar_child": 0, "apar_fork": 1}
    return {**base, **kw}


def run_rules(args, prompt, output, logits):
    fn = thread_rules(args, lambda: None)
    return fn(prompt, output, logits.clone())


def test_plugin_leaves_other_requests_alone():
    assert thread_rules({}, lambda: None) is None
    assert thread_rules({"something": 1}, lambda: None) is None


def test_plugin_bans_like_the_engine():
    inf = float("-inf")
    logits = torch.zeros(16)
    out = run_rules(xargs(), [5, 6, 7], [8], logits)
    assert out[11] == inf and out[12] == inf and out[10] == 0  # [Child], [Join] never; [Fork] allowed
    assert run_rules(xargs(), [5, 6, 7], [8, 10], logits)[10] == inf  # not right after [Fork]
    assert run_rules(xargs(apar_own_start=3, apar_child=1), [5, 6, 7, 11], [], logits)[10] == inf  # nor after [Child]
    assert run_rules(xargs(apar_fork=0), [5, 6, 7], [8], logits)[10] == inf  # depth cap / mode
    assert (run_rules(xargs(), [5, 6, 7], [8], logits)[:10] == 0).all()  # nothing else touched


def test_plugin_penalties_count_what_the_thread_sees():
    """A child's request: prompt = chat prompt (3 tokens) + parent's answer through [Fork] +
    [Child]; penalties count the parent's answer tokens and the child's own, never the chat
    prompt's (frequency/presence) nor control tokens; repetition covers the prompt too."""
    prompt = [4, 4, 5, 6, 6, 10, 11]  # chat prompt 4 4 5, parent's answer 6 6 [Fork], [Child]
    output = [7, 6]
    logits = torch.linspace(-2, 2, 16)
    args = xargs(apar_own_start=6, apar_child=1, apar_fork=0, apar_frequency_penalty=0.5, apar_presence_penalty=0.25)
    out = run_rules(args, prompt, output, logits)
    expected = logits.clone()
    counts = Counter([6, 6, 7, 6])  # answer tokens, control ones dropped
    for token, n in counts.items():
        expected[token] -= 0.5 * n + 0.25
    for token in (10, 11, 12):
        expected[token] = float("-inf")
    assert torch.equal(out, expected)
    rep = run_rules(xargs(apar_repetition_penalty=2.0), [4, 5, 6], [9], logits)
    for token in (4, 5, 6, 9):  # prompt and output, divided where positive, multiplied where negative
        want = logits[token] / 2 if logits[token] > 0 else logits[token] * 2
        assert torch.isclose(rep[token], want)
    assert rep[7] == logits[7]


def test_plugin_counts_penalties_step_by_step_as_over_the_whole_context():
    """The plugin keeps one count per request and extends it by each sampled token: at every step
    the row equals the engine's rule over prompt + output, also after an output cut back."""
    from parafork.engine.sampler import penalize_row

    args = xargs(apar_own_start=3, apar_frequency_penalty=0.5, apar_presence_penalty=0.25, apar_repetition_penalty=1.3)
    fn = thread_rules(args, lambda: None)
    prompt, logits = [4, 4, 5], torch.linspace(-2, 2, 16)
    for output in ([], [6], [6, 7], [6, 7, 6], [6, 7, 6, 10], [6, 7, 6, 10, 11, 4], [6, 9], [6, 9, 9]):
        want = logits.clone()
        penalize_row(want.numpy(), prompt + output, 3, (10, 11, 12), 0.5, 0.25, 1.3)
        got = fn(prompt, output, logits.clone())
        keep = [t for t in range(16) if t not in (10, 11, 12)]  # the bans edit these
        assert torch.equal(got[keep], want[keep]), output


def test_plugin_builds_one_head_guard_for_every_request():
    """A head guard scans the whole vocabulary once (~0.18 s on the bundled model's): one guard
    per processor, not one per request (an APAR answer is ~5 requests)."""
    loads = []

    def loader():
        loads.append(1)
        return object()

    guards: dict = {}
    first = thread_rules(xargs(apar_no_repeat_heads=1), loader, guards)
    second = thread_rules(xargs(apar_no_repeat_heads=1, apar_child=1), loader, guards)
    assert first is not None and second is not None and len(loads) == 1 and len(guards) == 1
    thread_rules(xargs(apar_no_repeat_heads=1), loader)  # without a shared cache: one more
    assert len(loads) == 2


def test_driver_refuses_what_vllm_cannot_do():
    driver = VLLMDriver("http://127.0.0.1:9/v1", "m", None, CONTROL)
    for params, word in [
        (SamplingParams(), "plan_budget"),
        (driver_params(join=True), "join"),
        (driver_params(logprobs=2), "logprobs"),
        (driver_params(speculative="ngram"), "speculative"),
        (driver_params(logits_rules=(lambda t, l: None,)), "logits_rules"),
    ]:
        with pytest.raises(ValueError, match=word):
            driver.resolve(params)
    assert driver.resolve(SamplingParams(mode="ar")).mode == "ar"  # no budget planning without forks
    assert driver.resolve(None).plan_budget is False


def test_with_tree_priority_every_request_of_an_answer_carries_the_answers_arrival():
    """vLLM preempts the largest (priority, arrival): a tree's requests share its arrival
    number, so the youngest tree goes first, whole; without the option none is sent."""
    from parafork.vllm.driver import DriverThread, _Tree
    from parafork.vllm.server import VLLMServer

    for on in (True, False):
        driver = VLLMDriver("http://127.0.0.1:9/v1", "m", None, CONTROL, tree_priority=on)
        params = driver.resolve(driver_params(mode="apar"))
        trees = []
        for arrival in range(2):
            root = DriverThread(prefix=[1, 2], own_tokens=[])
            tree = _Tree(root, params)
            tree.arrival = next(driver._arrivals)
            child = DriverThread(prefix=[1, 2, CONTROL.fork_id], own_tokens=[CONTROL.child_id], depth=1)
            trees.append([driver._body(tree, t, False, i).get("priority") for i, t in enumerate((root, child))])
        assert trees == ([[0, 0], [1, 1]] if on else [[None, None], [None, None]])
    assert "--scheduling-policy" in VLLMServer("m").command
    assert "--scheduling-policy" not in VLLMServer("m", priority_scheduling=False).command


def test_fork_limit_bans_forks_on_requests_sent_under_load():
    """A request sent while the driver has fork_limit requests open may not fork; other modes
    and an unloaded request are untouched; a limit below one request is refused."""
    from parafork.vllm.driver import DriverThread, _Tree

    driver = VLLMDriver("http://127.0.0.1:9/v1", "m", None, CONTROL, fork_limit=2)
    root = DriverThread(prefix=[1, 2], own_tokens=[])
    tree = _Tree(root, driver.resolve(driver_params(mode="apar")))
    assert driver._body(tree, root, False, 0)["vllm_xargs"]["apar_fork"] == 1
    assert driver._body(tree, root, False, 0, loaded=True)["vllm_xargs"]["apar_fork"] == 0
    with pytest.raises(ValueError, match="fork_limit"):
        VLLMDriver("http://127.0.0.1:9/v1", "m", None, CONTROL, fork_limit=0)


# -- real vLLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server():
    from parafork.vllm.server import VLLMServer, merged_model, vllm_unavailable

    reason = vllm_unavailable()
    if reason:
        pytest.skip(f"vLLM: {reason}")
    with VLLMServer(merged_model("bundled"), dtype="float32") as server:
        yield server


@pytest.fixture(scope="module")
def driver(vllm_server):
    path = models.resolve_model_path("bundled")
    tokenizer, control = models.load_tokenizer(path)
    return VLLMDriver(vllm_server.url, vllm_server.served_name, tokenizer, control,
                      models.sampling_defaults(path, models.default_adapter("bundled")),
                      tree_priority=vllm_server.priority_scheduling)  # every real test sends tree priorities


def wait_idle(server, timeout=20.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        running = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
        if running == 0 or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


@pytest.mark.model
def test_vllm_forked_answer_in_reading_order(driver, vllm_server):
    """APAR over vLLM forks, and its restored answer equals the same tree decoded serially (a
    parent's request stopped at each [Fork] and resumed after the child: another path through
    vLLM) and the text streamed piece by piece."""
    params = driver_params(mode="apar", max_tokens=300)  # room for the whole answer: where a budget runs
    apar = driver.generate(PROMPT, params)  # out depends on the order tokens arrive in
    assert apar.finish_reason == "stop"
    serial = driver.generate(PROMPT, driver_params(mode="serial", max_tokens=300))
    assert apar.num_threads >= 3 and apar.num_requests == apar.num_threads
    assert apar.text == serial.text and apar.num_threads == serial.num_threads
    assert serial.num_requests > serial.num_threads  # resumed parents
    assert "[Fork]" not in apar.text and "[Child]" not in apar.text
    assert 0 < apar.prefilled_tokens < apar.prompt_tokens  # children found their prefix in vLLM's cache

    async def streamed():
        return [out async for out in driver.stream(PROMPT, params)]

    outs = driver.run(streamed())
    assert len(outs) > 3 and "".join(o.delta for o in outs) == apar.text and outs[-1].finished
    assert wait_idle(vllm_server) == 0


@pytest.mark.model
def test_vllm_matches_parafork_engine(driver):
    """Greedy, float32 on both: the APAR answer over vLLM is parafork's engine's (same rules, no
    budget planning) token for token. (Not a check of AR here: vLLM's CPU kernels differ from
    torch's by ~0.01 in log-probability, and this prompt's AR answer meets a near tie at its
    31st token, ' electronic' over ' digital' by 0.05 in HF float32, by -0.0006 in vLLM.)"""
    from parafork.llm import LLM

    llm = LLM("bundled", dtype="float32")
    params = driver_params(mode="apar", max_tokens=300)
    engine = llm.generate(PROMPT, params)[0]
    remote = driver.generate(PROMPT, params)
    assert engine.finish_reason == remote.finish_reason == "stop"
    assert remote.token_ids == engine.token_ids
    assert remote.num_threads == engine.num_threads > 1


@pytest.mark.model
def test_vllm_penalties_plugin_equals_vllm_builtin(driver):
    """One thread that may not fork: the plugin's frequency penalty (over the answer) and vLLM's
    own (over the request's output) are the same thing, so the answers agree."""
    for penalty in (0.0, 0.8):
        ours = driver.generate(PROMPT, driver_params(mode="apar", max_depth=1, max_tokens=80, frequency_penalty=penalty))
        vllm_own = driver.generate(PROMPT, driver_params(mode="ar", max_tokens=80, frequency_penalty=penalty))
        assert ours.num_threads == 1 and ours.token_ids == vllm_own.token_ids, penalty


@pytest.mark.model
def test_vllm_fork_limit_leaves_answers_sent_under_load_unforked(driver, vllm_server):
    """fork_limit=1, two answers at once: the first's root is sent alone and forks, its
    children (sent while it is open) and the second answer's root are sent with [Fork]
    banned, so the second answer is one thread, the answer of a thread that may not fork."""
    limited = VLLMDriver(vllm_server.url, vllm_server.served_name, driver.tokenizer, driver.control,
                         driver.sampling_defaults, tree_priority=True, fork_limit=1)
    params = driver_params(mode="apar", max_tokens=300)

    async def both():
        return await asyncio.gather(limited.generate_async(PROMPT, params), limited.generate_async(PROMPT, params))

    first, second = limited.run(both())
    alone = driver.generate(PROMPT, driver_params(mode="apar", max_depth=1, max_tokens=300))
    assert first.num_threads > 1 and first.requests_unforked == first.num_threads - 1
    assert second.num_threads == 1 and second.requests_unforked == 1
    assert second.token_ids[:100] == alone.token_ids[:100]
    assert limited.open_requests == 0 and wait_idle(vllm_server) == 0


@pytest.mark.model
def test_vllm_budget_and_stop(driver, vllm_server):
    """max_tokens covers every thread; a stop string ends the restored answer where it starts
    and closes every request of the tree."""
    short = driver.generate(PROMPT, driver_params(max_tokens=60))
    assert short.num_generated_tokens == 60 and short.finish_reason == "length" and short.num_threads > 1
    full = driver.generate(PROMPT, driver_params(max_tokens=300))
    stop = "\n2."
    assert stop in full.text
    cut = driver.generate(PROMPT, driver_params(max_tokens=300, stop=[stop]))
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert wait_idle(vllm_server) == 0


@pytest.mark.model
def test_vllm_cancelled_stream_aborts_every_request(driver, vllm_server):
    """Closing the stream while several threads decode aborts all their vLLM requests."""
    seen_running = []

    async def partial():
        agen = driver.stream(PROMPT, driver_params(max_tokens=512))
        async for out in agen:
            if out.num_threads >= 3:
                # vLLM's gauge can lag the requests just sent: read it for up to 3 s while they run.
                for _ in range(30):
                    running = vllm_server.metrics().get("vllm:num_requests_running", 0)
                    if running >= 2:
                        break
                    await asyncio.sleep(0.1)
                seen_running.append(running)
                break
        await agen.aclose()

    driver.run(partial())
    assert seen_running and seen_running[0] >= 2  # threads ran side by side as vLLM requests
    assert wait_idle(vllm_server) == 0


def test_cli_refuses_what_the_vllm_bench_cannot_do(capsys):
    from parafork.cli import main

    assert main(["bench", "latency", "--backend", "vllm", "--spec", "ngram"]) == 2
    assert "speculative" in capsys.readouterr().err
    assert main(["bench", "latency", "--backend", "vllm", "--temperature", "1"]) == 2
    assert "greedily" in capsys.readouterr().err
    assert main(["bench", "throughput", "--backend", "vllm", "--quant", "q8_0"]) == 2
    assert main(["bench", "latency", "--backend", "vllm", "--fork-limit", "8"]) == 2
    assert main(["bench", "throughput", "--fork-limit", "8"]) == 2  # parafork's engine: not its option
    assert "--quant" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --backend vllm is offered only where a bench runs on vLLM
        main(["bench", "engine", "--backend", "vllm"])


def test_agreement_between_engines_counts_equal_answers_and_where_they_part():
    from parafork.bench.vllm import _agreement

    records = [
        {"a": {"token_ids": [1, 2, 3, 4]}, "b": {"token_ids": [1, 2, 3, 4]}},  # equal
        {"a": {"token_ids": [1, 2, 9, 9]}, "b": {"token_ids": [1, 2, 3, 4, 5]}},  # parts after 2 of 5
        {"a": {"token_ids": [7]}, "b": {"token_ids": [8]}},  # parts at once
    ]
    got = _agreement(records, "a", "b", "_x")
    assert got["same_x_as_engine"] == pytest.approx(1 / 3)
    assert got["agreed_x_share"] == pytest.approx((1 + 2 / 5 + 0) / 3)


@pytest.mark.model
def test_vllm_drafts_with_the_exported_head(vllm_server, tmp_path):
    """`parafork export --draft-head` writes the shipped head where vLLM's EAGLE-3 loader reads it:
    a vLLM server given it drafts with it, accepts a share of its drafts near what parafork's
    engine accepts (so the head reads the same hidden states, positions and vocabulary mapping
    there), and writes the greedy answer of the server without drafts (the module's, for a plain
    AR request, which its plugin leaves alone)."""
    import json

    from openai import OpenAI

    from parafork.export import export_head
    from parafork.vllm.server import VLLMServer, merged_model

    model = merged_model("bundled")
    head = export_head("bundled", tmp_path)
    spec = json.dumps({"method": "eagle3", "model": str(head), "num_speculative_tokens": 3})
    messages = [{"role": "user", "content": "How can I improve my time management skills?"}]
    ask = dict(messages=messages, max_tokens=160, temperature=0, extra_body={"frequency_penalty": 0.3})
    plain = OpenAI(base_url=vllm_server.url, api_key="-").chat.completions.create(model=vllm_server.served_name, **ask)
    with VLLMServer(model, dtype="float32", plugin=False, extra_args=["--speculative-config", spec],
                    log_path=tmp_path / "vllm-eagle.log") as server:
        drafted = OpenAI(base_url=server.url, api_key="-").chat.completions.create(model=server.served_name, **ask)
        m = server.metrics()
    assert drafted.choices[0].message.content == plain.choices[0].message.content
    proposed, accepted = m["vllm:spec_decode_num_draft_tokens_total"], m["vllm:spec_decode_num_accepted_tokens_total"]
    assert proposed >= 3 * 20 and accepted / proposed > 0.08  # (a head vLLM misread would draft noise: ~0)
