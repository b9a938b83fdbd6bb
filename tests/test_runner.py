"""The Runner protocol as the engine uses it: stable sequence ids, explicit forks and
releases, each id released exactly once, and the pools empty after every request."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parafork.engine.runner import BlockCopy, Runner, RunnerInfo
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams


class RecordingRunner:
    """Wraps a real runner and checks the calls a sequence-addressed backend relies on."""

    def __init__(self, inner, max_live_sequences=None) -> None:
        self.inner = inner
        info = inner.info
        self.info = RunnerInfo(info.vocab_size, info.max_position, info.weight_bytes, info.prefix_caching,
                               max_live_sequences)
        self.live: set[int] = set()
        self.released: list[int] = []
        self.idle: set[int] = set()  # released and not used since
        self.forks: list[tuple[int, int, BlockCopy | None]] = []
        self.truncated: list[tuple[int, int]] = []
        self.joins: list[tuple[int, list[int]]] = []
        self.most_live = 0

    def forward(self, batch):
        ids = [s.seq_id for s in batch]
        assert len(set(ids)) == len(ids), "a sequence appears twice in one batch"
        self.live.update(ids)
        self.idle.difference_update(ids)
        self.most_live = max(self.most_live, len(self.live))
        if self.info.max_live_sequences is not None:
            assert max(self.live) < self.info.max_live_sequences
        return self.inner.forward(batch)

    def fork(self, parent, child, copy):
        assert parent in self.live, "fork from a sequence the runner never saw"
        assert child not in self.live, "fork into a live sequence"
        self.forks.append((parent, child, copy))
        self.live.add(child)
        self.idle.discard(child)
        self.inner.fork(parent, child, copy)

    def release(self, seq_id):
        assert seq_id not in self.idle, "released twice"
        self.idle.add(seq_id)
        self.live.discard(seq_id)
        self.released.append(seq_id)
        self.inner.release(seq_id)

    def truncate(self, seq_id, position):
        assert seq_id in self.live, "truncating a sequence that is not live"
        self.truncated.append((seq_id, position))
        self.inner.truncate(seq_id, position)

    def join(self, seq_id, sources):
        assert seq_id in self.live and all(s.seq_id in self.live for s in sources), "a join of sequences not live"
        self.joins.append((seq_id, [s.seq_id for s in sources]))
        self.inner.join(seq_id, sources)


@pytest.fixture()
def recorded(tiny_dir):
    def make(max_live_sequences=None, **config):
        llm = LLM(str(tiny_dir), dtype="float32", block_size=4, **config)
        llm.engine.runner = RecordingRunner(llm.engine.runner, max_live_sequences)
        llm.engine.scheduler.seq_ids.limit = max_live_sequences
        return llm

    return make


def test_torch_runner_implements_the_protocol(tiny_llm):
    assert isinstance(tiny_llm.engine.runner, Runner)
    assert tiny_llm.engine.runner.info.vocab_size == len(tiny_llm.tokenizer)


def test_every_sequence_is_forked_then_released_once(recorded):
    llm = recorded(num_kv_blocks=256)
    force = ForceForks(llm.control, frozenset({2, 5, 9}), child_tokens=6)
    prompts = [{"prompt_token_ids": list(range(100 + i, 112 + i))} for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=60, logits_rules=[force]))
    assert all(o.num_threads == 4 for o in outs)
    runner = llm.engine.runner
    assert len(runner.forks) == 9 and not runner.live
    assert len(runner.released) == 12  # 3 roots + 9 children, each released once
    assert all(copy is None or copy.num_slots < 4 for _, _, copy in runner.forks)  # only a partial tail is copied
    llm.check_idle()


def test_drafted_sequences_are_truncated_while_live_and_released_once(recorded):
    llm = recorded(num_kv_blocks=256, speculative="ngram")
    force = ForceForks(llm.control, frozenset({2, 5, 9}), child_tokens=20, root_tokens=24)
    prompts = [{"prompt_token_ids": list(range(100 + i, 112 + i))} for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=300, logits_rules=[force]))
    runner = llm.engine.runner
    assert sum(o.num_accepted_tokens for o in outs) > 0
    assert runner.truncated and all(n > 0 for _, n in runner.truncated)
    assert not runner.live and len(runner.released) == 12
    llm.check_idle()


@pytest.mark.parametrize("defer", [None, 0])  # 0: deferred children count against the cap before they hold an id
def test_a_cap_on_live_sequences_bans_forks_beyond_it_and_still_finishes(recorded, defer):
    llm = recorded(max_live_sequences=3, num_kv_blocks=256, defer_forks_from_rows=defer)
    force = ForceForks(llm.control, frozenset({1, 2, 3, 4, 5}), child_tokens=4)
    prompts = [{"prompt_token_ids": list(range(300 + i, 310 + i))} for i in range(2)]
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=50, logits_rules=[force])
    if defer == 0:  # between the step that samples a [Fork] and the next, the child is owed an id
        llm.add_request(prompts[0], params)
        while not any(t.fork_deferred for r in llm.engine.requests.values() for t in r.threads):
            llm.step()
        assert llm.engine._fork_room() == llm.engine.seq_ids.room - 1
        while llm.has_unfinished_requests():
            llm.step()
    outs = llm.generate(prompts, params)
    assert all(o.finished for o in outs)
    assert sum(o.num_threads for o in outs) >= 3 and llm.engine.runner.most_live <= 3
    llm.check_idle()


def run_four_forking_requests(llm, forks, abort_after: int, check, **params) -> None:
    """Four requests with forced forks stepped to the end, the second aborted after
    `abort_after` steps; `check(steps, seq ids the threads hold)` after every step."""
    force = ForceForks(llm.control, frozenset(forks), child_tokens=8, root_tokens=14)
    params = SamplingParams(plan_budget=False, no_repeat_heads=False, max_tokens=80, logits_rules=[force], **params)
    ids = [llm.add_request({"prompt_token_ids": list(range(500 + 3 * i, 516 + 3 * i))}, params) for i in range(4)]
    steps = 0
    while llm.has_unfinished_requests():
        llm.step()
        steps += 1
        if steps == abort_after:
            llm.abort(ids[1])
        check(steps, {t.seq_id for r in llm.engine.requests.values() for t in r.threads if t.seq_id is not None})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.integers(12, 40),
    forks=st.sets(st.integers(1, 10), max_size=4),
    abort_after=st.integers(0, 12),
    stats_every=st.integers(1, 3),
    reserve=st.sampled_from([0.0, 1.0]),
    defer=st.sampled_from([None, 0]),  # 0: every fork deferred (a child waits a step for its KV)
)
def test_after_finish_abort_and_preemption_every_block_and_sequence_id_is_free(
    recorded, blocks, forks, abort_after, stats_every, reserve, defer
):
    llm = recorded(num_kv_blocks=blocks, admission_reserve=reserve, defer_forks_from_rows=defer)

    def check(steps: int, with_ids: set[int]) -> None:
        if steps % stats_every == 0:
            assert llm.engine.runner.live <= llm.engine.scheduler.seq_ids.live == with_ids
            assert llm.stats().sequences_live == len(with_ids)

    run_four_forking_requests(llm, forks, abort_after, check)
    assert not llm.engine.runner.live
    llm.check_idle()


def test_a_step_mixing_prefill_chunks_and_decode_rows_equals_each_alone(tiny_llm, tiny_dir):
    """Continuous batching: a step that admits prompts (long slices, each attended on its own)
    beside threads that decode (one padded group) gives every slice its own context's logits."""
    import torch

    from parafork import models
    from parafork.config import EngineConfig
    from parafork.engine.runner import SequenceSlice
    from parafork.runners.torch_runner import TorchRunner

    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    runner = TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="float32"))
    first = list(range(300, 330))
    runner.forward([SequenceSlice(0, first, 0, list(range(0, 8)))])  # seq 0's context, fed before
    prompt_a, prompt_b, draft = list(range(400, 440)), list(range(500, 520)), [7, 8, 9]
    batch = [
        SequenceSlice(1, prompt_a, 0, list(range(8, 18))),
        SequenceSlice(0, [42], 30, list(range(0, 8))),
        SequenceSlice(2, prompt_b, 0, list(range(18, 23))),
        SequenceSlice(3, draft, 0, list(range(23, 24)), num_logits=3),
    ]
    assert len(runner._prepare(batch).groups) == 3  # the short slices together, each prompt alone
    out = runner.forward(batch)
    with torch.no_grad():
        refs = [hf(torch.tensor([ids])).logits[0, -n:] for ids, n in
                [(prompt_a, 1), (first + [42], 1), (prompt_b, 1), (draft, 3)]]
    torch.testing.assert_close(out, torch.cat(refs), atol=2e-4, rtol=0)


def test_a_long_slice_attends_as_the_padded_path_does_after_a_prefix_and_with_joined_spans(tiny_llm, tiny_dir):
    """A slice over SHORT_SLICE tokens (a prefill chunk) attends alone through fused attention:
    causal when its keys are its queries, else under a mask (a chunk after earlier ones, a slice
    with joined spans). Against HF for the second chunk, and against the padded path for all."""
    import torch

    from parafork import models
    from parafork.config import EngineConfig
    from parafork.engine.runner import KVSpan, SequenceSlice
    from parafork.runners.torch_runner import TorchRunner

    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    first, second = list(range(300, 330)), list(range(600, 640))

    def run(short_slice: int) -> tuple[list[torch.Tensor], list[tuple]]:
        runner = TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="float32"))
        runner.SHORT_SLICE = short_slice
        outs, kinds = [], []

        def forward(batch):
            grp = runner._prepare(batch).groups[0]
            kinds.append((grp.causal, grp.long_mask is not None))
            outs.append(runner.forward(batch))

        forward([SequenceSlice(0, first, 0, list(range(0, 18)))])
        forward([SequenceSlice(0, second, 30, list(range(0, 18)))])
        # Sequence 2 joins entries 4..19 of sequence 1, then feeds 24 tokens after its own 12.
        forward([SequenceSlice(1, list(range(700, 720)), 0, list(range(18, 23)))])
        forward([SequenceSlice(2, list(range(800, 812)), 0, list(range(23, 32)))])
        span = KVSpan(tuple(range(18, 23)), 4, 20)
        forward([SequenceSlice(2, list(range(900, 924)), 12, list(range(23, 32)), position_offset=20, joined=(span,))])
        return outs, kinds

    (fused, kinds), (padded, padded_kinds) = run(TorchRunner.SHORT_SLICE), run(10**6)
    assert kinds == [(True, False), (False, True), (True, False), (False, False), (False, True)]  # 12 tokens: short
    assert set(padded_kinds) == {(False, False)}  # the padded path: a bias, no fused attention
    for a, b in zip(fused, padded):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    with torch.no_grad():
        ref = hf(torch.tensor([first + second])).logits[0, -1:]
    torch.testing.assert_close(fused[1], ref, atol=2e-4, rtol=0)


def test_siblings_read_their_shared_prefix_once_and_attend_exactly_as_each_alone(tiny_llm, tiny_dir):
    """Decode rows whose block tables share full blocks before their queries (APAR siblings)
    attend to that prefix once for all of them, merged by log-sum-exp with each one's own keys:
    the logits equal HF's over each sequence's whole context, drafts and a stranger included."""
    import torch

    from parafork import models
    from parafork.config import EngineConfig
    from parafork.engine.runner import BlockCopy, SequenceSlice
    from parafork.runners.torch_runner import TorchRunner

    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    prompt, other = list(range(300, 370)), list(range(800, 830))  # 70 tokens: 17 full blocks of 4, 2 in the 18th

    def run(min_saved: int):
        runner = TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="float32"))
        runner.MIN_SAVED_KEYS = min_saved
        runner.forward([SequenceSlice(0, prompt, 0, list(range(18)))])
        runner.forward([SequenceSlice(9, other, 0, list(range(40, 48)))])
        tables = {0: list(range(18))}
        for child, tail in ((1, 20), (2, 21), (3, 22)):  # forked after the prompt: full blocks shared
            runner.fork(0, child, BlockCopy(17, tail, 2))
            tables[child] = list(range(17)) + [tail, tail + 10]
        batch = [SequenceSlice(0, [5], 70, tables[0] + [30]), SequenceSlice(1, [6], 70, tables[1]),
                 SequenceSlice(9, [7], 30, list(range(40, 48))), SequenceSlice(2, [8], 70, tables[2]),
                 SequenceSlice(3, [9, 10, 11], 70, tables[3], num_logits=3)]
        shared = runner._prepare(batch).groups[0].shared
        return runner.forward(batch), shared

    cascade, shared = run(4)
    assert [p.members.tolist() for p in shared] == [[0, 1, 3, 4]] and len(shared[0].slots) == 68
    plain, none = run(10**6)
    assert none == []
    with torch.no_grad():
        refs = [hf(torch.tensor([ids])).logits[0, -n:] for ids, n in
                [(prompt + [5], 1), (prompt + [6], 1), (other + [7], 1), (prompt + [8], 1), (prompt + [9, 10, 11], 3)]]
    torch.testing.assert_close(cascade, torch.cat(refs), atol=2e-4, rtol=0)
    torch.testing.assert_close(cascade, plain, atol=2e-4, rtol=0)


def test_apar_answers_are_the_same_with_and_without_shared_prefix_attention(tiny_dir):
    """End to end on forced forks (block size 4, so siblings share many blocks): the same tokens."""
    prompts = ["Give me three tips for sleeping well. " * 6, "List some ways to save money on groceries. " * 5]
    answers = []
    for min_saved in (4, 10**6):
        llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=512, block_size=4)
        llm.engine.runner.MIN_SAVED_KEYS = min_saved
        merges = []
        merge = llm.engine.runner._merge_shared
        llm.engine.runner._merge_shared = lambda *a: merges.append(1) or merge(*a)
        force = ForceForks(llm.control, frozenset({3, 6, 9, 12}), child_tokens=12, root_tokens=20)
        outs = llm.generate(prompts, SamplingParams(max_tokens=120, logits_rules=[force]))
        assert all(o.num_threads > 1 for o in outs)
        answers.append([o.token_ids for o in outs])
        assert (len(merges) > 0) == (min_saved == 4)  # the shared prefixes were attended once (or never)
        llm.check_idle()
    assert answers[0] == answers[1]


@pytest.mark.parametrize("path", ["padded", "long", "kernel"])
def test_a_tree_slice_gives_each_token_the_logits_of_its_path_alone(tiny_llm, tiny_dir, path):
    """A slice whose tokens form a tree (a draft with siblings, `SequenceSlice.parents`): each
    token sits one position after its parent and sees the context and its own path only, so its
    logits equal a chain's over context + path (HF's in fp32; the same runner's chains in bf16
    through the row kernel), with a decode row of another sequence in the same step."""
    import torch

    from parafork import models
    from parafork.config import EngineConfig
    from parafork.engine.runner import SequenceSlice
    from parafork.runners import row_kernel
    from parafork.runners.torch_runner import TorchRunner

    if path == "kernel" and row_kernel.load() is None:
        pytest.skip(f"row kernel unavailable: {row_kernel.unavailable()}")
    dtype = torch.bfloat16 if path == "kernel" else torch.float32
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    runner = TorchRunner(hf, EngineConfig(num_kv_blocks=128, block_size=4, dtype=str(dtype).removeprefix("torch.")))
    if path == "long":
        runner.SHORT_SLICE = 2  # the tree's 7 tokens attend alone, under a mask
    context, other = list(range(300, 322)), list(range(800, 810))
    tokens, parents = [5, 6, 7, 8, 9, 10, 11], (-1, 0, 1, 0, 3, 0, 2)
    paths = [[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4], [0, 5], [0, 1, 2, 6]]
    tree = SequenceSlice(0, tokens, 22, list(range(8)), num_logits=7, parents=parents)
    assert tree.paths() == paths
    runner.forward([SequenceSlice(0, context, 0, list(range(8)))])
    runner.forward([SequenceSlice(1, other, 0, list(range(8, 12)))])
    stranger = SequenceSlice(1, [42], 10, list(range(8, 12)))
    groups = runner._prepare([stranger, tree]).groups
    assert (groups[0].kv_lens is not None) == (path == "kernel") and len(groups) == (2 if path == "long" else 1)
    out = runner.forward([stranger, tree])
    if path == "kernel":  # the oracle: each path fed as a chain by the same runner, in its own blocks
        refs = [runner.forward([SequenceSlice(0, [42], 10, list(range(8, 12)))])]  # (rewrites the same entry)
        for k, chain in enumerate(paths):
            seq, blocks = 10 + k, list(range(16 + 8 * k, 24 + 8 * k))
            refs.append(runner.forward([SequenceSlice(seq, context + [tokens[m] for m in chain], 0, blocks)]))
        torch.testing.assert_close(out, torch.cat(refs), atol=3e-2, rtol=0)
    else:
        with torch.no_grad():
            refs = [hf(torch.tensor([other + [42]])).logits[0, -1:]]
            refs += [hf(torch.tensor([context + [tokens[m] for m in chain]])).logits[0, -1:] for chain in paths]
        torch.testing.assert_close(out, torch.cat(refs), atol=2e-4, rtol=0)


def test_a_tree_slice_is_refused_where_parents_are_no_tree_or_the_runner_takes_chains_only(tiny_llm, tiny_dir):
    import torch

    from parafork import models
    from parafork.config import EngineConfig
    from parafork.engine.runner import SequenceSlice
    from parafork.runners.hf_runner import HFRunner

    for parents in [(0, 0), (-1, 1), (-1,)]:
        with pytest.raises(ValueError, match="not a tree"):
            SequenceSlice(0, [5, 6], 0, [0], parents=parents)
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    runner = HFRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="float32"))
    assert not runner.info.tree_slices
    with pytest.raises(ValueError, match="chains only"):
        runner.forward([SequenceSlice(0, [5, 6, 7], 0, [0], num_logits=3, parents=(-1, 0, 0))])
