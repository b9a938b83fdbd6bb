"""The engine against the HF oracle: AR exactness, fork exactness, batching, KV accounting.

Forced forks here test the mechanics, so the answer policies that may ban a fork or end a body
the rule wants (budget planning, the head guard; tested in test_answers.py) are off in those
requests: `plan_budget=False, no_repeat_heads=False`."""
from __future__ import annotations

import pytest
import torch

from parafork import models
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams

from .conftest import PROMPTS


class LogitsRecorder:
    """A logits rule that keeps every thread's context length and logits row."""

    def __init__(self) -> None:
        self.rows: list[tuple[object, int, torch.Tensor]] = []

    def __call__(self, thread, logits: torch.Tensor) -> None:
        self.rows.append((thread, len(thread.token_ids), logits.clone()))


def assert_pool_full(llm) -> None:
    llm.check_idle()  # every KV block and sequence id back in its pool


def check_against_oracle(llm, hf, recorder: LogitsRecorder, atol: float) -> int:
    """Every recorded row equals the oracle's logits over that thread's own context."""
    ct = llm.control
    by_thread: dict[int, list[tuple[int, torch.Tensor]]] = {}
    threads = {}
    for thread, n, row in recorder.rows:
        by_thread.setdefault(thread.thread_id, []).append((n, row))
        threads[thread.thread_id] = thread
    keep = torch.ones(llm.engine.runner.info.vocab_size, dtype=torch.bool)
    keep[list(ct.ids)] = False  # the APAR rules edit these columns
    checked = 0
    for tid, rows in by_thread.items():
        ids = torch.tensor([threads[tid].token_ids])
        with torch.no_grad():
            ref = hf(ids).logits[0]
        for n, row in rows:
            diff = (row[keep] - ref[n - 1][keep]).abs().max().item()
            assert diff < atol, f"thread {tid} at context {n}: max diff {diff}"
            checked += 1
    return checked


@pytest.mark.model
def test_ar_greedy_equals_hf_generate_token_for_token(base_llm, base_hf):
    hits = base_llm.engine.block_manager.hit_tokens
    outs = base_llm.generate(PROMPTS, SamplingParams(max_tokens=40, mode="ar"))
    outs += base_llm.generate(PROMPTS[:1], SamplingParams(max_tokens=40, mode="ar"))
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([models.apply_chat_template(base_llm.tokenizer, prompt)])
        ref = base_hf.generate(ids, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids))
        ref_tokens = ref[0, ids.shape[1] :].tolist()
        eos = base_llm.tokenizer.eos_token_id
        if eos in ref_tokens:
            ref_tokens = ref_tokens[: ref_tokens.index(eos)]
        assert out.token_ids == ref_tokens, prompt
        assert out.num_threads == 1
    # The repeated prompt's full blocks came from the prefix cache (the five ran together, so
    # they found nothing), so the equality above covers a cached prefix too.
    first = len(models.apply_chat_template(base_llm.tokenizer, PROMPTS[0]))
    assert base_llm.engine.block_manager.hit_tokens - hits == (first - 1) // 16 * 16
    assert_pool_full(base_llm)


@pytest.mark.model
def test_forked_threads_see_exactly_their_ancestors_on_the_real_model(base_llm, base_hf):
    rec = LogitsRecorder()
    force = ForceForks(base_llm.control, frozenset({6, 15, 22}), child_tokens=12)
    out = base_llm.generate(PROMPTS[0], SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=90, logits_rules=[rec, force]))[0]
    assert out.num_threads == 4
    # fp32 noise on this 30-layer model reaches 0.99e-4 with a cold prefix cache, and 1.04e-4 when
    # the prompt's cached KV came from a prefill computed apart from other prompts (attention
    # groups, torch_runner.py); a masking error moves logits by > 1e-2.
    assert check_against_oracle(base_llm, base_hf, rec, atol=2e-4) >= 45
    assert_pool_full(base_llm)


def test_forked_threads_see_exactly_their_ancestors_nested(tiny_llm, tiny_dir):
    """Depth 3, block size 4: forks land on and off block boundaries; children fork too."""
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    rec = LogitsRecorder()

    nested = _every_thread_forks_at((3, 8), tiny_llm.control)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=120, max_depth=3, max_threads=16, logits_rules=[rec, nested])
    out = tiny_llm.generate({"prompt_token_ids": list(range(100, 113))}, params)[0]
    assert out.num_threads > 4
    assert max(t.depth for t, _, _ in rec.rows) == 2
    check_against_oracle(tiny_llm, hf, rec, atol=1e-4)
    assert_pool_full(tiny_llm)


def _every_thread_forks_at(counts, control, end_after: int | None = None):
    """Every thread forks after these own-token counts, where it may, and ends after
    `end_after` own tokens (None: runs free)."""
    def rule(thread, logits):
        n = len(thread.own_tokens)
        if end_after is not None and n >= end_after:
            logits.fill_(float("-inf"))
            logits[min(control.eos_ids)] = 0
        elif n in counts and logits[control.fork_id] != float("-inf"):
            logits.fill_(float("-inf"))
            logits[control.fork_id] = 0
    return rule


def test_deferred_forks_see_exactly_their_ancestors_with_one_row_fewer_each(tiny_dir):
    """Every fork deferred (defer_forks_from_rows=0): a child gets its parent's KV through the
    [Fork] a step later and feeds [Child] alone. Each thread's logits still equal the HF oracle's
    over its own context (depth 3, forks on and off block boundaries, four requests at once),
    the tokens equal those of immediate forks (every thread ends by rule, not by the shared
    budget, whose end would depend on when each thread ran), and one row per fork is saved."""
    outs, fed = {}, {}
    for name, limit in (("immediate", None), ("deferred", 0)):
        llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4, defer_forks_from_rows=limit)
        forward, fed[name] = llm.engine.runner.forward, 0

        def counting(slices, forward=forward, name=name):
            fed[name] += sum(len(s.token_ids) for s in slices)
            return forward(slices)

        llm.engine.runner.forward = counting
        rec = LogitsRecorder()
        params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=400, max_depth=3, max_threads=16,
                                logits_rules=[rec, _every_thread_forks_at((3, 8), llm.control, end_after=14)])
        outs[name] = llm.generate([{"prompt_token_ids": list(range(100 + i, 113 + 2 * i))} for i in range(4)], params)
        if name == "deferred":
            hf = models.load_hf_model(tiny_dir, llm.tokenizer, torch.float32)
            assert check_against_oracle(llm, hf, rec, atol=1e-4) > 100
        assert_pool_full(llm)
    forks = sum(o.num_threads - 1 for o in outs["deferred"])
    assert forks > 8 and sum(o.num_deferred_forks for o in outs["deferred"]) == forks
    for now, later in zip(outs["immediate"], outs["deferred"]):
        assert later.token_ids == now.token_ids and later.num_threads == now.num_threads and now.num_deferred_forks == 0
    assert fed["immediate"] - fed["deferred"] == forks


def test_a_fork_does_not_change_the_parent(tiny_llm):
    """The parent's tokens are those of a plain run over the same context (the child's
    writes into its copied tail block never reach the parent's blocks): every token the
    root sampled itself, before, between and after both forks, equals a fresh AR replay."""
    rec = LogitsRecorder()
    force = ForceForks(tiny_llm.control, frozenset({2, 5}), child_tokens=30)
    prompt = {"prompt_token_ids": list(range(200, 211))}
    out = tiny_llm.generate(prompt, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=60, ignore_eos=True, logits_rules=[rec, force]))[0]
    assert out.num_threads == 3
    root = next(t for t, _, _ in rec.rows if t.parent is None)
    fork_id = tiny_llm.control.fork_id
    positions = [k for k in range(root.own_start, len(root.token_ids)) if root.token_ids[k] != fork_id]
    assert [k - root.own_start for k in positions][:4] == [0, 1, 3, 4] and positions[-1] - root.own_start > 6
    replays = tiny_llm.generate(
        [{"prompt_token_ids": root.token_ids[:k]} for k in positions], SamplingParams(max_tokens=1, mode="ar")
    )
    assert [r.token_ids for r in replays] == [[root.token_ids[k]] for k in positions]
    assert_pool_full(tiny_llm)


def test_concurrent_requests_with_forks_equal_each_run_alone(tiny_llm):
    force = ForceForks(tiny_llm.control, frozenset({3, 9, 14}), child_tokens=7)
    prompts = [{"prompt_token_ids": list(range(300 + 7 * i, 310 + 9 * i))} for i in range(6)]
    params = [SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=30 + 5 * i, logits_rules=[force]) for i in range(6)]
    together = tiny_llm.generate(prompts, params)
    alone = [tiny_llm.generate(p, q)[0] for p, q in zip(prompts, params)]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids
        assert a.num_threads == b.num_threads > 1
    assert_pool_full(tiny_llm)


@pytest.mark.model
def test_concurrent_requests_with_forks_equal_each_run_alone_on_the_real_model(base_llm):
    force = ForceForks(base_llm.control, frozenset({5, 11}), child_tokens=10)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=50, logits_rules=[force])
    together = base_llm.generate(PROMPTS[:3], params)
    for prompt, out in zip(PROMPTS[:3], together):
        assert base_llm.generate(prompt, params)[0].token_ids == out.token_ids
    assert_pool_full(base_llm)


@pytest.mark.parametrize("defer", [None, 0])
def test_tiny_pool_preempts_and_recomputes_without_losing_anything(tiny_dir, defer):
    """(`defer=0`: every fork deferred, so some requests are preempted while a child waits for
    its KV; it is then recomputed like every thread.)"""
    from parafork.llm import LLM

    small = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=24, block_size=4, admission_reserve=0,  # admit all: preempt
                defer_forks_from_rows=defer)
    # Every thread ends by rule (not by the shared token budget), so scheduling cannot
    # change which tokens each thread gets.
    force = ForceForks(small.control, frozenset({2, 6}), child_tokens=14, root_tokens=16)
    prompts = [{"prompt_token_ids": list(range(400 + i, 420 + i))} for i in range(5)]
    params = SamplingParams(max_tokens=500, logits_rules=[force])
    together = small.generate(prompts, params)
    assert sum(o.num_preemptions for o in together) > 0, "the pool was meant to be too small"
    roomy = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=512, block_size=4)
    for prompt, out in zip(prompts, together):
        assert out.finish_reason == "stop" and out.error is None and out.num_threads == 3
        assert roomy.generate(prompt, params)[0].token_ids == out.token_ids
    assert_pool_full(small)


def test_prefix_cache_reuses_blocks_across_requests_and_changes_no_output(tiny_dir, tiny_llm):
    from parafork.llm import LLM

    uncached = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4, prefix_caching=False)
    shared = list(range(500, 530))
    prompts = [{"prompt_token_ids": shared + [600 + i, 700 + i]} for i in range(3)] + [{"prompt_token_ids": shared}]
    force = ForceForks(tiny_llm.control, frozenset({3}), child_tokens=6, root_tokens=12)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=60, logits_rules=[force])
    hits = tiny_llm.engine.block_manager.hit_tokens
    for prompt in prompts:  # one after another: each finds the earlier ones' blocks
        assert tiny_llm.generate(prompt, params)[0].token_ids == uncached.generate(prompt, params)[0].token_ids
    # 30 shared tokens = 7 full blocks of 4, found by each of the last three requests.
    assert tiny_llm.engine.block_manager.hit_tokens - hits == 3 * 28
    assert uncached.engine.block_manager.hit_tokens == 0
    assert_pool_full(tiny_llm)


def test_a_request_larger_than_the_pool_ends_cleanly(tiny_dir):
    from parafork.llm import LLM

    small = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=6, block_size=4)
    out = small.generate({"prompt_token_ids": list(range(500, 515))}, SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert out.finished and out.finish_reason == "length" and "KV" in out.error
    with pytest.raises(ValueError, match="KV pool"):
        small.generate({"prompt_token_ids": list(range(500, 530))}, SamplingParams(max_tokens=5))
    assert_pool_full(small)


def test_aborted_and_closed_streams_free_every_block(tiny_llm):
    force = ForceForks(tiny_llm.control, frozenset({2, 4}), child_tokens=50)
    params = SamplingParams(max_tokens=200, ignore_eos=True, logits_rules=[force])
    rid = tiny_llm.add_request({"prompt_token_ids": list(range(50, 70))}, params)
    for _ in range(8):
        tiny_llm.step()
    assert tiny_llm.engine.block_manager.num_free < tiny_llm.engine.block_manager.num_blocks
    tiny_llm.abort(rid)
    assert_pool_full(tiny_llm)
    stream = tiny_llm.stream([{"prompt_token_ids": list(range(70, 90))}] * 2, params)
    next(stream)
    stream.close()
    assert_pool_full(tiny_llm)
    assert not tiny_llm.has_unfinished_requests()


def test_stream_deltas_add_up_to_the_final_text_in_reading_order(tiny_llm):
    force = ForceForks(tiny_llm.control, frozenset({3, 8}), child_tokens=6)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=60, logits_rules=[force])
    prompt = {"prompt_token_ids": list(range(600, 620))}
    final = tiny_llm.generate(prompt, params)[0]
    pieces = list(tiny_llm.stream(prompt, params))
    assert "".join(p.delta for p in pieces) == final.text
    assert pieces[-1].finished and sum(not p.finished for p in pieces) > 1


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_llm):
    force = ForceForks(tiny_llm.control, frozenset({3}), child_tokens=8)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=30, temperature=0.8, top_p=0.9, seed=7, logits_rules=[force])
    prompt = {"prompt_token_ids": list(range(700, 712))}
    alone = tiny_llm.generate(prompt, params)[0]
    crowd = tiny_llm.generate([prompt, {"prompt_token_ids": [5, 6, 7]}], [params, SamplingParams(max_tokens=20)])[0]
    assert alone.token_ids == crowd.token_ids
    other = tiny_llm.generate(prompt, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=30, temperature=0.8, seed=8, logits_rules=[force]))[0]
    assert other.token_ids != alone.token_ids


def test_apar_rules_caps(tiny_llm):
    ct = tiny_llm.control

    def always_fork(thread, logits):
        if logits[ct.fork_id] != float("-inf"):
            logits.fill_(float("-inf"))
            logits[ct.fork_id] = 0

    rec = LogitsRecorder()
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=80, max_threads=5, max_depth=2, logits_rules=[always_fork, rec])
    out = tiny_llm.generate({"prompt_token_ids": [10, 11, 12]}, params)[0]
    assert out.num_threads == 5
    threads = {t.thread_id: t for t, _, _ in rec.rows}.values()
    for t in threads:
        own = t.own_tokens
        assert ct.child_id not in own[1:]  # never sampled
        pairs = zip(own, own[1:])
        assert not any(a in (ct.fork_id, ct.child_id) and b == ct.fork_id for a, b in pairs)
        if t.depth >= 1:
            assert ct.fork_id not in own
    ar = tiny_llm.generate({"prompt_token_ids": [10, 11, 12]}, SamplingParams(max_tokens=20, mode="ar", logits_rules=[always_fork]))[0]
    assert ar.num_threads == 1
    assert out.num_generated_tokens >= 80 or out.finish_reason == "stop"


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_dtype_auto_follows_the_cpu_and_bf16_runs_on_any_cpu(tiny_dir, tiny_llm, monkeypatch, fast_bf16):
    """'auto' is bf16 only where oneDNN computes bf16 natively; an explicit bf16 still runs
    (unpacked) on CPUs without it instead of failing in oneDNN's weight packing."""
    from parafork import config
    from parafork.runners import torch_runner

    fast = fast_bf16 and config.cpu_has_fast_bf16()  # packing needs the real CPU feature
    monkeypatch.setattr(config, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(torch_runner, "cpu_has_fast_bf16", lambda: fast)
    assert config.resolve_dtype("auto") == (torch.bfloat16 if fast_bf16 else torch.float32)
    bf16 = LLM(str(tiny_dir), dtype="bfloat16", num_kv_blocks=64, block_size=4, row_kernel=False)  # oneDNN packing
    assert bf16.engine.runner.layers[0].qkv.packed == fast
    assert tiny_llm.engine.runner.layers[0].qkv.packed  # fp32 weights are packed for oneDNN everywhere
    prompt = {"prompt_token_ids": [10, 11, 12]}
    params = SamplingParams(max_tokens=8, mode="ar", ignore_eos=True)
    assert bf16.generate(prompt, params)[0].num_generated_tokens == 8
    with pytest.raises(ValueError, match="dtype"):
        config.resolve_dtype("float16")


def test_bad_sampling_params_are_refused_with_clear_errors():
    for kwargs, msg in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"mode": "fast"}, "mode"),
        ({"max_depth": 0}, "max_depth"),
        ({"seed": "x"}, "seed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)


def test_models_refuse_unknown_names_and_pickled_weights(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="never downloads"):
        models.resolve_model_path("meta-llama/Llama-3-8B")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(models.ModelNotFoundError, match="safetensors"):
        models.resolve_model_path(tmp_path)


def test_hf_fallback_backend_gives_the_same_answers_with_forks(tiny_dir, tiny_llm):
    from parafork.runners.hf_runner import HFRunner
    from parafork.llm import LLM

    slow = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=64, block_size=4, backend="hf")
    assert isinstance(slow.engine.runner, HFRunner)
    force = ForceForks(slow.control, frozenset({2, 5}), child_tokens=5, root_tokens=9)
    prompts = [{"prompt_token_ids": list(range(30, 41))}, {"prompt_token_ids": list(range(60, 66))}]
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=60, logits_rules=[force])
    assert [o.token_ids for o in slow.generate(prompts, params)] == [o.token_ids for o in tiny_llm.generate(prompts, params)]
    assert_pool_full(slow)


def test_raw_mode_keeps_fork_markers_in_the_text_and_starts_no_thread(tiny_llm):
    ct = tiny_llm.control
    prompt = {"prompt_token_ids": list(range(120, 130))}
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=6, mode="raw", logit_bias={ct.fork_id: 100})
    out = tiny_llm.generate(prompt, params)[0]
    assert out.num_threads == 1 and out.token_ids.count(ct.fork_id) == 6 and out.text.count("[Fork]") == 6
    apar = tiny_llm.generate(prompt, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=6, mode="apar", logit_bias={ct.fork_id: 100}))[0]
    assert apar.num_threads > 1 and "[Fork]" not in apar.text
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llm.generate(prompt, SamplingParams(max_tokens=2, logit_bias={10**7: 1.0}))
    assert_pool_full(tiny_llm)


def test_serial_mode_decodes_the_same_tree_one_thread_at_a_time(tiny_llm):
    force = ForceForks(tiny_llm.control, frozenset({2, 5, 8}), child_tokens=7, root_tokens=14)
    prompt = {"prompt_token_ids": list(range(300, 321))}
    apar = tiny_llm.generate(prompt, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=200, logits_rules=[force]))[0]
    serial = tiny_llm.generate(prompt, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=200, mode="serial", logits_rules=[force]))[0]
    assert serial.token_ids == apar.token_ids and serial.num_threads == apar.num_threads == 4
    # One sampled token per step: every generated token but the forced [Child]s.
    assert serial.num_steps == serial.num_generated_tokens - (serial.num_threads - 1)
    assert apar.num_steps < serial.num_steps
    assert_pool_full(tiny_llm)


def test_preemptions_and_the_tokens_they_make_the_engine_feed_again_are_counted(tiny_dir):
    """A pool too small for three answers at once: the newest is preempted and recomputed. With
    the prefix cache off every token cached at a preemption is fed again, so the recomputed
    tokens are exactly those; per request and in the engine's totals (`/metrics` reads them)."""
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=14, block_size=4, prefix_caching=False, admission_reserve=0)
    lost = []
    preempt = llm.engine.scheduler._preempt

    def counting(request):
        lost.append(sum(t.num_cached for t in request.threads))
        preempt(request)

    llm.engine.scheduler._preempt = counting
    ban_eos = {i: -100.0 for i in llm.control.eos_ids}
    params = SamplingParams(max_tokens=24, mode="ar", logit_bias=ban_eos)
    outs = llm.generate([{"prompt_token_ids": list(range(100 + 10 * i, 108 + 10 * i))} for i in range(3)], params)
    stats = llm.stats()
    assert lost and sum(o.num_preemptions for o in outs) == len(lost) == stats.preemptions_total
    assert sum(o.num_recomputed_tokens for o in outs) == sum(lost) == stats.recomputed_tokens_total > 0
    llm.check_idle()
