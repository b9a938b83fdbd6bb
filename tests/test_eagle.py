"""Drafts from a trained head inside APAR threads (engine/eagle.py): lossless (greedy the same
token for token; sampled answers drawn as without drafts) with real forks, every thread's cache built
from the runner's hidden states, and clear refusals where a head cannot serve."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from parafork.draft.head import EagleHead
from parafork.engine.step_cost import StepCost
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams

from .test_speculation import FewTokens

FREE = dict(plan_budget=False, no_repeat_heads=False)
PROMPT_IDS = [{"prompt_token_ids": list(range(600 + k, 640 + k))} for k in range(3)]


@pytest.fixture(scope="module")
def eagle_llm(tiny_dir, head_dir):
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4, draft_head=str(head_dir))
    llm.engine.step_cost = StepCost.linear(0.0)  # every proposed draft is fed: the verifier is what is tested
    llm.engine.drafter.pass_cost = llm.engine.drafter.thread_cost = 0.0
    return llm


@pytest.mark.parametrize("defer", [False, True])
def test_greedy_with_forks_is_the_same_with_head_drafts(eagle_llm, defer, monkeypatch):
    monkeypatch.setattr(eagle_llm.engine, "defer_forks_from_rows", 0 if defer else None)
    force = ForceForks(eagle_llm.control, frozenset({3, 10}), child_tokens=30, root_tokens=50)
    params = SamplingParams(max_tokens=200, mode="apar", logits_rules=[force], **FREE)
    plain = eagle_llm.generate(PROMPT_IDS, params)
    drafted = eagle_llm.generate(PROMPT_IDS, replace(params, speculative="eagle"))
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert all(o.num_threads >= 3 for o in drafted)
    assert sum(o.num_draft_tokens for o in drafted) > 50
    for o in drafted:  # per draft position: every draft reaches position 0, fewer each position on
        # (a sibling reaches its position beside a chain token: positions <= chain tokens + siblings)
        assert o.num_draft_tokens - o.num_sibling_tokens <= sum(o.drafted_at) <= o.num_draft_tokens
        assert sum(o.accepted_at) == o.num_accepted_tokens
        assert list(o.drafted_at) == sorted(o.drafted_at, reverse=True)
        assert all(a <= d for a, d in zip(o.accepted_at, o.drafted_at))
    assert eagle_llm.engine.drafter.states == {}  # every thread's cache dropped with its request
    eagle_llm.check_idle()


def test_children_draft_from_their_parents_cache(eagle_llm):
    # Children get drafts from their first own step: their cache is the parent's below the [Fork].
    force = ForceForks(eagle_llm.control, frozenset({5}), child_tokens=25, root_tokens=8)
    params = SamplingParams(max_tokens=120, mode="apar", logits_rules=[force], speculative="eagle", **FREE)
    gaps = eagle_llm.engine.drafter.gaps
    out = eagle_llm.generate(PROMPT_IDS[0], params)[0]
    assert out.num_threads == 2 and out.num_draft_tokens > 25
    assert eagle_llm.engine.drafter.gaps == gaps


@pytest.fixture(scope="module")
def few_llm(tiny_dir, tmp_path_factory):
    """The tiny model with a random head whose draft vocabulary is FewTokens' six tokens and the
    control tokens: where FewTokens puts the model's mass, so its drawn drafts are often kept."""
    from transformers import LlamaConfig

    from parafork.draft.head import HeadConfig

    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4, step_cost="fixed")
    c = llm.control
    vocab = sorted(set(FewTokens.TOKENS) | {c.fork_id, c.child_id, c.join_id, *c.eos_ids})
    torch.manual_seed(1)
    head = EagleHead(HeadConfig.for_target(LlamaConfig.from_pretrained(tiny_dir), vocab_size=llm.engine.runner.info.vocab_size,
                                           draft_vocab_size=len(vocab), aux_layers=(0, 1)))
    head.set_vocabulary(vocab)
    folder = tmp_path_factory.mktemp("few_head")
    head.save(folder)
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4, draft_head=str(folder))
    llm.engine.step_cost = StepCost.linear(0.0)  # every proposed draft is fed: the verifier is what is tested
    llm.engine.drafter.pass_cost = llm.engine.drafter.thread_cost = 0.0
    return llm


def test_sampled_answers_with_drawn_head_drafts_keep_the_models_law(few_llm):
    """At temperature > 0 the head draws its drafts (and, by default, two siblings a position,
    without replacement) from its own distribution and the engine keeps one or draws another by
    the speculative-sampling rule (sampler.settle_offer): every position still draws from
    p = softmax(FewTokens.LOGITS) (chi-square over single tokens). When this test was written
    with chains alone, a verifier that kept every drawn token the model allows gave chi-square
    184 (908 of 1,349 drafted tokens kept), the engine 4.5 (642 of 1,516); with siblings the
    engine 11.5 (765 of 3,729 rows kept, 228 of them siblings), and 5.4 pooled over 120 seeds."""
    few = FewTokens(few_llm.control)
    params = [SamplingParams(max_tokens=120, mode="ar", temperature=1.0, seed=s, speculative="eagle", logits_rules=[few])
              for s in range(30)]
    outs = few_llm.generate([PROMPT_IDS[s % 3] for s in range(30)], params)
    assert sum(o.num_head_accepted_tokens for o in outs) > 300  # drawn drafts were exercised, and kept
    assert sum(o.num_head_accepted_tokens for o in outs) < sum(o.num_head_draft_tokens for o in outs)
    p = FewTokens.probabilities()
    counts = Counter(t for o in outs for t in o.token_ids)
    n = sum(counts.values())
    assert set(counts) <= set(FewTokens.TOKENS)
    chi2 = sum((counts.get(t, 0) - n * float(p[i])) ** 2 / (n * float(p[i])) for i, t in enumerate(FewTokens.TOKENS))
    assert chi2 < 20.5, chi2  # the 99.9% quantile of chi-square with 5 degrees of freedom
    # Seeded, requests run the same way draw the same answers again (drafts are drawn with each
    # request's generator; beside other requests they may differ: a step sizes all drafts together,
    # and here the 30 requests outgrow the KV pool, which cuts drafts).
    first, again = (few_llm.generate([PROMPT_IDS[s % 3] for s in range(3)], params[:3]) for _ in range(2))
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    assert sum(o.num_sibling_tokens for o in outs) > 100  # sampled requests' siblings were fed too
    few_llm.check_idle()


class Wander:
    """Every position draws from FewTokens' six tokens, by the model's own logits for them
    (standardized) plus FewTokens' logits in an order that moves with the context's length:
    greedy answers that the small head's siblings often hold, and that a wrong row would change."""

    def __call__(self, thread, logits: torch.Tensor) -> None:
        if torch.isfinite(logits).sum() == 1:
            return  # a token forced by an earlier rule (a fork, an end)
        own = logits[FewTokens.TOKENS].clone()
        order = torch.randperm(6, generator=torch.Generator().manual_seed(len(thread.token_ids)))
        logits.fill_(float("-inf"))
        logits[FewTokens.TOKENS] = (own - own.mean()) / (own.std() + 1e-6) + 3 * FewTokens.LOGITS[order]


@pytest.mark.parametrize("mode", ["ar", "apar"])
def test_greedy_with_siblings_is_the_same_and_takes_fewer_steps(few_llm, mode, monkeypatch):
    """A head's draft fed as a tree (the chain and, per position, the head's next most likely
    tokens: SamplingParams.num_draft_siblings): where the model's token is a sibling, it and the token
    its row gives are taken, and it is fed again next step. The answer is the same token for
    token as without drafts and as with chains alone, in fewer steps; every block and sequence
    id comes back."""
    engine = few_llm.engine
    monkeypatch.setattr("parafork.engine.speculation.propose", lambda *a: [])  # the head's drafts alone
    rules = [ForceForks(few_llm.control, frozenset({3, 9}), child_tokens=20, root_tokens=30)] if mode == "apar" else []
    params = SamplingParams(max_tokens=90, mode=mode, logits_rules=rules + [Wander()], **FREE)
    plain = few_llm.generate(PROMPT_IDS, params)
    runs = {}
    for siblings in (0, 2):
        runs[siblings] = few_llm.generate(PROMPT_IDS, replace(params, speculative="eagle", num_draft_siblings=siblings))
        assert [o.token_ids for o in runs[siblings]] == [o.token_ids for o in plain]
    chains, trees = runs[0], runs[2]
    assert sum(o.num_sibling_tokens for o in chains) == 0
    taken = sum(o.num_accepted_sibling_tokens for o in trees)
    assert taken > 10 and taken < sum(o.num_sibling_tokens for o in trees)
    assert sum(o.num_steps for o in trees) < sum(o.num_steps for o in chains)
    if mode == "apar":
        assert all(o.num_threads >= 3 for o in trees)
    for o in trees:
        assert o.num_draft_tokens - o.num_sibling_tokens <= sum(o.drafted_at) <= o.num_draft_tokens
        assert sum(o.accepted_at) == o.num_accepted_tokens
    assert engine.drafter.states == {}
    few_llm.check_idle()


def test_threads_that_end_while_others_draft_hand_the_drafter_nothing(eagle_llm):
    """Many short prompts at once (more rows in a step than a prompt has tokens), children
    ending while their parents and other requests go on: a thread that ended this step gave its
    KV back, and the drafter must not be handed rows of the step as its (found under 16 clients:
    a negative slice wrapped around the step's rows)."""
    force = ForceForks(eagle_llm.control, frozenset({2, 4}), child_tokens=6, root_tokens=30)
    params = SamplingParams(max_tokens=80, mode="apar", logits_rules=[force], **FREE)
    prompts = [{"prompt_token_ids": [700 + k, 800 + k, 900 + k]} for k in range(12)]
    plain = eagle_llm.generate(prompts, params)
    drafted = eagle_llm.generate(prompts, replace(params, speculative="eagle"))
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert all(o.num_threads == 3 for o in drafted)
    eagle_llm.check_idle()


def test_the_head_sits_out_where_its_pass_costs_more_than_it_yields(eagle_llm, monkeypatch):
    """The engine runs the head only where the tokens it has been yielding are worth its pass:
    priced dear it sits out (no head drafts, same answer), and its yield estimate drifts back
    to the prior while it rests, so it tries again once priced as before."""
    drafter = eagle_llm.engine.drafter
    params = SamplingParams(max_tokens=40, mode="ar", speculative="eagle", **FREE)
    monkeypatch.setattr(drafter, "pass_cost", 100.0)
    dear = eagle_llm.generate(PROMPT_IDS[0], params)[0]
    assert dear.num_head_draft_tokens == 0
    monkeypatch.setattr(drafter, "pass_cost", 0.0)
    cheap = eagle_llm.generate(PROMPT_IDS[0], params)[0]
    assert cheap.num_head_draft_tokens > 0 and cheap.token_ids == dear.token_ids
    drafter.record(40, 80, 0)
    low = drafter.expected_yield[1]
    for _ in range(60):
        drafter.rest()
    assert low < 0.05 and drafter.expected_yield[1] > 0.4  # back near the prior of 1/2


def test_lookup_drafts_first_and_the_head_where_the_context_does_not_recur(eagle_llm):
    """speculative="eagle" drafts by lookup where the context recurs (no head pass) and from
    the head elsewhere; the output is the same either way, and the counts say which drafted."""
    stats = eagle_llm.engine.stats()
    params = SamplingParams(max_tokens=40, mode="ar", **FREE)
    repeating = {"prompt_token_ids": list(range(600, 610)) * 4}
    plain = eagle_llm.generate([repeating, PROMPT_IDS[0]], params)
    looped, fresh = eagle_llm.generate([repeating, PROMPT_IDS[0]], replace(params, speculative="eagle"))
    assert [looped.token_ids, fresh.token_ids] == [o.token_ids for o in plain]
    assert looped.num_draft_tokens > looped.num_head_draft_tokens  # some by lookup (the prompt recurs)
    assert fresh.num_head_draft_tokens > 0 and looped.num_head_accepted_tokens <= looped.num_head_draft_tokens
    after = eagle_llm.engine.stats()
    assert after.head_draft_tokens_total - stats.head_draft_tokens_total == \
        looped.num_head_draft_tokens + fresh.num_head_draft_tokens
    assert after.draft_tokens_total - stats.draft_tokens_total == looped.num_draft_tokens + fresh.num_draft_tokens


def test_the_head_reads_the_states_the_runner_computed(eagle_llm):
    # The drafter's cache of the prompt equals the head run over HF-free recomputed states:
    # a second request with the same prompt builds bit-identical keys.
    drafter = eagle_llm.engine.drafter
    seen = []
    real = drafter.observe
    drafter.observe = lambda tid, start, tokens, aux: (seen.append((start, len(tokens), aux.shape)), real(tid, start, tokens, aux))
    try:
        eagle_llm.generate(PROMPT_IDS[0], SamplingParams(max_tokens=6, mode="ar", speculative="eagle"))
    finally:
        drafter.observe = real
    h = eagle_llm.engine.runner.embed.shape[1]
    assert seen[0][0] == 0 and seen[0][1] == 40 and seen[0][2] == (40, 2 * h)  # the prompt, every position
    assert sum(n for _, n, _ in seen) >= 40 + 5  # then every verified token


def test_refusals(tiny_dir, head_dir, tmp_path):
    plain = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, step_cost="fixed")
    with pytest.raises(ValueError, match="needs a draft head"):
        plain.generate(PROMPT_IDS[0], SamplingParams(max_tokens=4, speculative="eagle"))
    # A head trained for another adapter is refused by name.
    head = EagleHead.load(head_dir)
    other = tmp_path / "other"
    head.config = replace(head.config, target_digest="0123456789ab")
    head.save(other)
    with pytest.raises(ValueError, match="trained for adapter 0123456789ab"):
        LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, draft_head=str(other))
    with pytest.raises(ValueError, match="hidden states"):
        LLM(str(tiny_dir), backend="llamacpp", quant="f32", num_kv_blocks=64, draft_head=str(head_dir))
    with pytest.raises(FileNotFoundError, match="no draft head"):
        LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, draft_head=str(tmp_path / "nothing"))


def test_the_heads_linears_through_the_row_kernel_keep_the_output(tiny_dir, head_dir):
    """bf16 with the row kernel: the head runs from packed bf16 weights, as the target does;
    the drafts may differ from fp32's, the answer may not."""
    llm = LLM(str(tiny_dir), dtype="bfloat16", num_kv_blocks=256, block_size=4, draft_head=str(head_dir))
    if llm.engine.runner.kernel is None:
        pytest.skip(f"the row kernel is not built here: {llm.engine.runner.linear_path}")
    assert llm.engine.drafter.linears["qkv"].kernel is not None
    llm.engine.step_cost = StepCost.linear(0.0)
    llm.engine.drafter.pass_cost = llm.engine.drafter.thread_cost = 0.0
    force = ForceForks(llm.control, frozenset({3}), child_tokens=20, root_tokens=30)
    params = SamplingParams(max_tokens=100, mode="apar", logits_rules=[force], **FREE)
    plain = llm.generate(PROMPT_IDS, params)
    drafted = llm.generate(PROMPT_IDS, replace(params, speculative="eagle"))
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert sum(o.num_draft_tokens for o in drafted) > 20


@pytest.mark.model
def test_the_shipped_head_drafts_for_the_bundled_model():
    """The head in parafork/adapters/smollm2-apar-eagle (LLM(..., speculative="eagle") loads it):
    on a real prompt it drafts and a share of its drafts is accepted (a head that misread
    the runner's states, positions or vocabulary would draft noise), and the answer is the one
    decoded without drafts, in AR and with APAR's real forks (float32; room for the whole answer:
    under a shared `max_tokens` threads that advance at another pace meet the budget elsewhere)."""
    llm = LLM("bundled", dtype="float32", speculative="eagle")
    # Priced free: what is tested is the head, not whether its timed price lets it run (in fp32,
    # beside other tests, a pass can cost what the head's prior yield is worth, and it sits out).
    llm.engine.drafter.pass_cost = llm.engine.drafter.thread_cost = 0.0
    prompt = [{"role": "user", "content": "How can I improve my time management skills?"}]
    for mode in ("ar", "apar"):
        params = SamplingParams(max_tokens=600, mode=mode)
        plain = llm.generate([prompt], replace(params, speculative="off"))[0]
        drafted = llm.generate([prompt], params)[0]
        assert plain.finish_reason == "stop" and drafted.token_ids == plain.token_ids
        assert drafted.num_head_draft_tokens >= 20, mode
        # (chains of 4 at any confidence, priced free: a head that drafted noise would be accepted ~0.01%)
        assert drafted.num_head_accepted_tokens / drafted.num_head_draft_tokens > 0.08, mode
    assert plain.num_threads > 1
    llm.check_idle()
