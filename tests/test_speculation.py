"""Speculative decoding inside threads (engine/speculation.py): n-gram drafts verified in the
step's one forward. The oracle is the engine without drafts: greedy output token for token,
seeded sampling draw for draw, and the sampled law by a chi-square test; KV invariants after
every rejection; the budget never passed by accepted drafts."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parafork.engine import speculation
from parafork.engine.runner import SequenceSlice
from parafork.engine.speculation import chain_gains, draft_lengths, propose
from parafork.engine.step_cost import StepCost
from parafork.engine.thread import DraftStats
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import DEFAULT_DRAFT_SIBLINGS, DEFAULT_DRAFT_TOKENS, SamplingParams

from .conftest import PROMPTS

FREE = dict(plan_budget=False, no_repeat_heads=False)  # forced forks test mechanics, not answer policies
PROMPT_IDS = [{"prompt_token_ids": list(range(300 + 7 * i, 310 + 9 * i))} for i in range(4)]


class FewTokens:
    """Every position samples from the same six tokens with fixed logits (forks as forced)."""

    TOKENS = [500, 501, 502, 503, 504, 505]
    LOGITS = torch.tensor([1.0, 0.5, 0.2, 0.0, -0.5, -1.0])

    def __init__(self, control) -> None:
        self.control = control

    @classmethod
    def probabilities(cls) -> torch.Tensor:
        return torch.softmax(cls.LOGITS, 0)

    def __call__(self, thread, logits: torch.Tensor) -> None:
        if torch.isfinite(logits).sum() == 1:
            return  # a token forced by an earlier rule (a fork, an end)
        logits.fill_(float("-inf"))
        logits[self.TOKENS] = self.LOGITS


def _thread(context: list[int], others: list[list[int]] = ()):
    request = SimpleNamespace(threads=[])
    thread = SimpleNamespace(token_ids=context, own_tokens=context, request=request)
    request.threads = [thread] + [SimpleNamespace(own_tokens=o) for o in others]
    return thread


def test_propose_copies_what_followed_the_latest_longest_match(tiny_llm):
    control = tiny_llm.control
    # The suffix (7, 8, 9) occurred twice; the latest occurrence was followed by 4, 5.
    assert propose(_thread([7, 8, 9, 1, 2, 7, 8, 9, 4, 5, 6, 7, 8, 9]), 2, control) == [4, 5]
    assert propose(_thread([7, 8, 9, 1, 2, 7, 8, 9, 4, 5, 6, 7, 8, 9]), 8, control) == [4, 5, 6, 7, 8, 9]
    # A longer match wins over a more recent shorter one.
    assert propose(_thread([1, 2, 3, 50, 9, 2, 3, 60, 1, 2, 3]), 1, control) == [50]
    # No n-gram of length >= NGRAM_MIN recurs: no draft; one token alone is not enough.
    assert propose(_thread([1, 2, 3, 4, 5, 6]), 4, control) == []
    assert speculation.NGRAM_MIN >= 2 and propose(_thread([1, 9, 2, 9]), 4, control) == []
    # Siblings' text is the second source.
    assert propose(_thread([1, 2, 3, 4, 5], others=[[9, 4, 5, 70, 71]]), 3, control) == [70, 71]
    # A draft ends after [Fork] or an end token and before [Child].
    eos = min(control.eos_ids)
    assert propose(_thread([4, 5, control.fork_id, 6, 1, 4, 5]), 4, control) == [control.fork_id]
    assert propose(_thread([4, 5, 6, eos, 6, 1, 4, 5]), 4, control) == [6, eos]
    assert propose(_thread([4, 5, 6, control.child_id, 6, 1, 4, 5]), 4, control) == [6]


def test_draft_lengths_follow_acceptance_the_cost_of_a_row_and_the_batch():
    sure, hopeless, fresh = DraftStats(accepted=40, rejected=0), DraftStats(accepted=0, rejected=20), DraftStats()
    cheap = StepCost.linear(0.08)  # each fed row 8% of a one-row step
    assert sure.acceptance > 0.95 and hopeless.acceptance < 0.05 and fresh.acceptance == 0.5
    assert draft_lengths([chain_gains(sure.acceptance, 8)], 1, 1, cheap) == [8]
    assert draft_lengths([chain_gains(sure.acceptance, 3)], 1, 1, cheap) == [3]  # never more than proposed
    assert draft_lengths([chain_gains(hopeless.acceptance, 8)], 1, 1, cheap) == [0]  # drafts that never pay are not fed
    assert draft_lengths([chain_gains(0.5, 8)], 1, 1, cheap)[0] >= 1  # prior 1/2: try
    assert draft_lengths([chain_gains(0.5, 8)], 1, 1, cheap)[0] > draft_lengths([chain_gains(0.5, 8)], 1, 1, StepCost.linear(0.4))[0]  # dear rows: shorter
    # One lone thread at a = 0.4 drafts; beside 11 other sampling threads the same draft does not pay.
    assert draft_lengths([chain_gains(0.4, 4)], 1, 1, cheap)[0] >= 1 and draft_lengths([chain_gains(0.4, 4)], 12, 12, cheap) == [0]
    # The better thread gets its tokens first.
    assert draft_lengths([chain_gains(0.3, 4), chain_gains(0.9, 4)], 6, 6, cheap) == [0, 4]
    for _ in range(30):
        hopeless.idle()  # a thread that stopped drafting drifts back to the prior and tries again
    assert draft_lengths([chain_gains(hopeless.acceptance, 8)], 1, 1, cheap)[0] >= 1
    # A prompt's chunk in the step (rows that make no token) does not make its tokens look dear:
    # counted whole, 100 rows beside a lone decode row let a 10% draft in; weighed against what
    # the decode row adds, a row costs what a decode row does and no draft can pay.
    assert draft_lengths([[0.1]], 1, 101, cheap) == [1]  # (the step whole: 9 one-row steps for 1 token)
    assert draft_lengths([[0.9, 0.8]], 1, 101, cheap, fixed_rows=100) == [0]
    assert draft_lengths([[0.9, 0.8]], 1, 1, cheap) == [2]
    flat = StepCost.from_times({1: 10.0, 4: 10.0, 8: 20.0})  # rows free up to 4: a chunk's too
    assert draft_lengths([[0.5]], 1, 3, flat, fixed_rows=2) == [1]


def test_draft_lengths_follow_the_measured_curve_not_a_constant():
    # Rows free up to 8, then each as dear as a one-row step (a machine whose multiply-adds run
    # out past 8 rows): a lone thread drafts up to the knee and no further at a = 0.6, ...
    knee = StepCost.from_times({1: 10.0, 8: 10.0, 16: 90.0})
    assert draft_lengths([chain_gains(0.6, 12)], 1, 1, knee) == [7]
    # ... and beside 8 sampling threads nothing, where a constant 5% a row would feed it.
    assert draft_lengths([chain_gains(0.6, 4)], 8, 8, knee) == [0]
    assert draft_lengths([chain_gains(0.6, 4)], 8, 8, StepCost.linear(0.05))[0] >= 1


def test_the_runner_returns_logits_at_every_drafted_position(tiny_llm, tiny_dir):
    from parafork import models
    from parafork.config import EngineConfig
    from parafork.runners.torch_runner import TorchRunner

    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    runner = TorchRunner(hf, EngineConfig(num_kv_blocks=8, block_size=4, dtype="float32"))
    context, other = list(range(600, 617)), [5, 6, 7]
    out = runner.forward([SequenceSlice(0, context, 0, [0, 1, 2, 3, 4], num_logits=5), SequenceSlice(1, other, 0, [5])])
    with torch.no_grad():
        ref = hf(torch.tensor([context])).logits[0, -5:]
        ref_other = hf(torch.tensor([other])).logits[0, -1]
    assert out.shape[0] == 6  # five rows for the first slice, one for the second, in batch order
    torch.testing.assert_close(out[:5], ref, atol=2e-4, rtol=0)
    torch.testing.assert_close(out[5], ref_other, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mode", ["ar", "serial", "apar"])
def test_greedy_output_is_the_same_token_for_token_with_drafts(tiny_llm, mode):
    force = ForceForks(tiny_llm.control, frozenset({3, 9, 14}), child_tokens=25, root_tokens=30)
    params = SamplingParams(max_tokens=500, mode=mode, logits_rules=[force], **FREE)
    plain = tiny_llm.generate(PROMPT_IDS, params)
    drafted = tiny_llm.generate(PROMPT_IDS, replace(params, speculative="ngram"))
    for a, b in zip(plain, drafted):
        assert a.token_ids == b.token_ids and a.num_threads == b.num_threads and a.finish_reason == b.finish_reason
        assert a.num_draft_tokens == 0 and b.num_accepted_tokens > 0  # drafts were fed and accepted
        assert b.num_steps < a.num_steps
    tiny_llm.check_idle()


@pytest.mark.model
def test_greedy_output_with_real_forks_on_the_bundled_model(bundled_llm):
    params = SamplingParams(max_tokens=700, max_threads=4)
    plain = bundled_llm.generate(PROMPTS[0], params)[0]  # one forked answer is enough: each costs CI time
    drafted = bundled_llm.generate(PROMPTS[0], replace(params, speculative="ngram"))[0]
    assert plain.finish_reason == "stop" and plain.num_threads > 1
    assert drafted.text == plain.text and drafted.num_threads == plain.num_threads
    assert drafted.num_accepted_tokens > 0
    bundled_llm.check_idle()


def test_engine_option_and_per_request_switch(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=128, block_size=4, speculative="ngram")
    on = llm.generate(PROMPT_IDS[0], SamplingParams(max_tokens=60, mode="ar"))[0]
    off = llm.generate(PROMPT_IDS[0], SamplingParams(max_tokens=60, mode="ar", speculative="off"))[0]
    assert on.num_draft_tokens > 0 and off.num_draft_tokens == 0 and on.token_ids == off.token_ids
    with pytest.raises(ValueError, match="speculative"):
        LLM(str(tiny_dir), dtype="float32", speculative="medusa")
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SamplingParams(speculative="ngram", num_draft_tokens=0)
    for bad in (-1, 9, True, 1.5):
        with pytest.raises(ValueError, match="num_draft_siblings"):
            SamplingParams(speculative="eagle", num_draft_siblings=bad)
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="medusa")


def test_draft_counts_a_request_does_not_draft_with_are_refused(tiny_dir, tiny_llm):
    """A draft count is never silently ignored: set where the request does not draft (its own
    `speculative` or the engine's default), or siblings with lookup (chains only), it is refused
    before the request is queued; left unset, the drafting method's default is put in."""
    lookup = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=128, block_size=4, speculative="ngram")
    lookup.engine.step_cost = StepCost.linear(0.0)  # every proposed draft is fed
    refused = [(lookup, dict(num_draft_siblings=1), "num_draft_siblings is for a trained head"),
               (lookup, dict(speculative="ngram", num_draft_siblings=0), "num_draft_siblings is for a trained head"),
               (lookup, dict(speculative="off", num_draft_tokens=3), r"num_draft_tokens set, but this request does not draft \(speculative='off'\)"),
               (tiny_llm, dict(num_draft_tokens=3, num_draft_siblings=2), "num_draft_tokens and num_draft_siblings set, .*speculative=None")]
    for llm, asked, why in refused:
        with pytest.raises(ValueError, match=why):
            llm.generate(PROMPT_IDS[0], SamplingParams(max_tokens=20, mode="ar", **asked))
        llm.check_idle()
    # Left unset, the counts the request's drafting reads are put in at `add` (the engine's default
    # method included); set, they are kept.
    resolved = {}
    for asked in (dict(), dict(num_draft_tokens=1), dict(speculative="off")):
        rid = lookup.add_request(PROMPT_IDS[0], SamplingParams(max_tokens=20, mode="ar", **asked))
        params = lookup.engine.requests[rid].params
        resolved[params.speculative] = resolved.get(params.speculative, []) + [(params.num_draft_tokens, params.num_draft_siblings)]
        while lookup.has_unfinished_requests():
            lookup.step()
    assert resolved == {"ngram": [(DEFAULT_DRAFT_TOKENS, None), (1, None)], "off": [(None, None)]}
    lookup.check_idle()
    params = SamplingParams(speculative="eagle")
    assert (params.num_draft_tokens, params.num_draft_siblings) == (None, None)
    assert params.with_draft_defaults().num_draft_tokens == DEFAULT_DRAFT_TOKENS
    assert params.with_draft_defaults().num_draft_siblings == DEFAULT_DRAFT_SIBLINGS
    assert SamplingParams(speculative="ngram").with_draft_defaults().num_draft_siblings is None


@pytest.mark.parametrize("mode", ["ar", "apar"])
def test_seeded_sampling_draws_the_same_tokens_with_drafts(tiny_llm, mode, monkeypatch):
    monkeypatch.setattr(tiny_llm.engine, "step_cost", StepCost.linear(0.0))  # every proposed draft is fed
    rules = [ForceForks(tiny_llm.control, frozenset({4, 12}), child_tokens=60, root_tokens=100), FewTokens(tiny_llm.control)]
    params = SamplingParams(max_tokens=400, mode=mode, temperature=0.9, top_p=0.95, seed=11, logits_rules=rules, **FREE)
    plain = tiny_llm.generate(PROMPT_IDS, params)
    drafted = tiny_llm.generate(PROMPT_IDS, replace(params, speculative="ngram"))
    assert [o.token_ids for o in plain] == [o.token_ids for o in drafted]
    # Drafts were verified (how many depends on the seeded draws).
    assert sum(o.num_accepted_tokens for o in drafted) > 10
    tiny_llm.check_idle()


def test_sampled_law_with_drafts_is_the_models_own(tiny_llm, monkeypatch):
    """Every position draws from p = softmax(FewTokens.LOGITS), independently of the past. A draft
    is what followed the latest earlier occurrence of the last tokens, so a verifier biased toward
    its drafts makes a token equal that lookup's prediction more often than sum(p^2), the chance
    that two independent draws agree; and single tokens must follow p (chi-square). When this test
    was written, a verifier that accepted every draft gave z = 67 on the lookup statistic (and
    passed the chi-square over single tokens: marginals alone do not show the bias); the engine
    gave z = -0.1."""
    # Rows cost nothing here, so every proposed draft is fed whole (the verifier is what is tested).
    monkeypatch.setattr(tiny_llm.engine, "step_cost", StepCost.linear(0.0))
    few = FewTokens(tiny_llm.control)
    params = [SamplingParams(max_tokens=120, mode="ar", temperature=1.0, seed=s, speculative="ngram", logits_rules=[few])
              for s in range(40)]
    outs = tiny_llm.generate([PROMPT_IDS[s % 4] for s in range(40)], params)
    assert sum(o.num_accepted_tokens for o in outs) > 300  # the drafts were exercised
    p = FewTokens.probabilities()
    index = {t: i for i, t in enumerate(FewTokens.TOKENS)}
    singles, hits, lookups = Counter(), 0, 0
    for o in outs:
        seq = [index[t] for t in o.token_ids]
        singles.update(seq)
        latest = {}  # (token, token) -> position of what followed its latest occurrence
        for t in range(2, len(seq)):
            key = (seq[t - 2], seq[t - 1])
            if key in latest:
                lookups += 1
                hits += seq[latest[key]] == seq[t]
            latest[key] = t
    n = sum(singles.values())
    chi2 = sum((singles.get(i, 0) - n * float(p[i])) ** 2 / (n * float(p[i])) for i in range(6))
    assert chi2 < 20.5  # the 99.9% quantile of chi-square with 5 degrees of freedom
    q = float((p**2).sum())
    z = (hits - lookups * q) / math.sqrt(lookups * q * (1 - q))
    assert lookups > 1000 and abs(z) < 4, (hits, lookups, z)
    tiny_llm.check_idle()


def test_rejections_give_back_their_blocks_and_preemption_still_loses_nothing(tiny_dir):
    small = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=24, block_size=4, speculative="ngram", admission_reserve=0)
    force = ForceForks(small.control, frozenset({2, 6}), child_tokens=14, root_tokens=16)
    params = SamplingParams(max_tokens=500, logits_rules=[force])
    prompts = [{"prompt_token_ids": list(range(400 + i, 420 + i))} for i in range(5)]
    ids = small._add_all(prompts, params, stream=False)
    finished = {}
    while len(finished) < len(ids):
        for out in small.step():
            small.engine.block_manager.check_invariants()  # after every step, rejections included
            if out.finished:
                finished[out.request_id] = out
    outs = [finished[i] for i in ids]
    assert sum(o.num_preemptions for o in outs) > 0 and sum(o.num_accepted_tokens for o in outs) > 0
    assert sum(o.num_draft_tokens - o.num_accepted_tokens for o in outs) > 0  # some drafts were rejected
    roomy = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=512, block_size=4)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "stop" and roomy.generate(prompt, params)[0].token_ids == out.token_ids
    small.check_idle()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_tokens=st.integers(1, 90), k=st.integers(1, 8), prompt=st.integers(0, 3))
def test_accepted_drafts_never_pass_max_tokens(tiny_llm, max_tokens, k, prompt):
    params = SamplingParams(max_tokens=max_tokens, mode="ar", speculative="ngram", num_draft_tokens=k)
    out = tiny_llm.generate(PROMPT_IDS[prompt], params)[0]
    plain = tiny_llm.generate(PROMPT_IDS[prompt], SamplingParams(max_tokens=max_tokens, mode="ar"))[0]
    assert out.num_generated_tokens <= max_tokens and out.token_ids == plain.token_ids
    tiny_llm.check_idle()


@pytest.fixture(scope="module")
def bundled_llm():
    return LLM("bundled", dtype="float32", num_kv_blocks=512)
