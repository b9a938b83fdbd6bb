"""Joins against an independent oracle: one HF forward over the whole tree, packed, with a
4-D mask and position ids built here from the join rules as the README states them (from the
threads' tokens, tree and `[Join]` indices only; nothing of the engine's spans or offsets).

Rules: a token sees its thread's context up to itself (ancestors up to the fork, then its
own) and, from a `[Join]` of its thread or of an ancestor before its fork on, each joined
child's own tokens but its end token, and recursively what that child joined. Positions:
a child's `[Child]` sits at its fork's position + 1; `[Join]` at max(previous + 1, last
position of everything it joins + 1); the rest + 1 each.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parafork import models
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams
from parafork.engine.thread import TreeShape

from .test_engine import LogitsRecorder
from .test_runner import recorded  # noqa: F401 (fixture)

# Root: forks after 3 and 8 own tokens, joins after 12, forks after 16 and 20, joins after 24, ends at 30.
TWO_GROUPS = dict(fork_after=frozenset({3, 8, 16, 20}), join_after=frozenset({12, 24}), child_tokens=6, root_tokens=30)
MECHANICS = dict(plan_budget=False, no_repeat_heads=False)  # the answer policies may not ban a forced fork


class TreeOracle:
    """Every computed token of a finished request's threads as one packed sequence."""

    def __init__(self, root) -> None:
        self.keys: list[tuple[object, int]] = []  # (thread that computed it, context index)
        self.pos: dict[tuple[int, int], int] = {}
        self._walk(root)
        self.index = {(id(t), k): n for n, (t, k) in enumerate(self.keys)}

    @staticmethod
    def owner(thread, k: int):
        while thread.parent is not None and k < thread.own_start:
            thread = thread.parent
        return thread

    @staticmethod
    def computed(thread) -> range:
        """Context indices whose KV the thread computed itself (its last token is never fed)."""
        return range(0 if thread.parent is None else thread.own_start, len(thread.token_ids) - 1)

    @staticmethod
    def own_joins(thread):
        return [j for j in thread.joins if j.owner is thread]

    def joined(self, join) -> list[tuple[object, int]]:
        keys = []
        for child in join.children:
            keys += [(child, k) for k in self.computed(child)]
            for j in self.own_joins(child):
                keys += self.joined(j)
        return keys

    def _walk(self, thread) -> None:
        joins = {j.index: j for j in self.own_joins(thread)}
        forks = {thread.own_start + i: c for i, c in thread.children.items()}
        prev = None if thread.parent is None else self.pos[(id(self.owner(thread.parent, thread.own_start - 1)), thread.own_start - 1)]
        for k in self.computed(thread):
            if k in joins:
                last = max([self.pos[(id(t), i)] for t, i in self.joined(joins[k])], default=-1)
                p = max(prev + 1, last + 1)
            else:
                p = 0 if prev is None else prev + 1
            self.pos[(id(thread), k)] = prev = p
            self.keys.append((thread, k))
            if k in forks:  # the child's context up to here is known: place it before going on
                self._walk(forks[k])
        for k, child in forks.items():  # a fork at the thread's last (never fed) token
            if k not in self.computed(thread):
                self._walk(child)

    def visible(self, thread, k: int) -> set[int]:
        seen = {self.index[(id(self.owner(thread, i)), i)] for i in range(k + 1)}
        node, limit = thread, k
        while node is not None:
            for join in self.own_joins(node):
                if join.index <= limit:
                    seen |= {self.index[(id(t), i)] for t, i in self.joined(join)}
            limit, node = node.own_start - 1, node.parent
        return seen

    def logits(self, hf) -> torch.Tensor:
        n = len(self.keys)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for q, (t, k) in enumerate(self.keys):
            allowed[q, sorted(self.visible(t, k))] = True
        ids = torch.tensor([[t.token_ids[k] for t, k in self.keys]])
        pos = torch.tensor([[self.pos[(id(t), k)] for t, k in self.keys]])
        bias = torch.zeros(n, n).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            return hf(input_ids=ids, position_ids=pos, attention_mask=bias).logits[0]

    def row(self, thread, n: int) -> int:
        """Packed row whose logits the thread sampled from with `n` tokens of context."""
        return self.index[(id(self.owner(thread, n - 1)), n - 1)]


def check_rows(llm, hf, rec: LogitsRecorder, atol: float) -> tuple[int, int]:
    """Every recorded row equals the oracle's; returns (rows checked, rows after a join)."""
    root = next(t for t, _, _ in rec.rows if t.parent is None)
    oracle = TreeOracle(root)
    ref = oracle.logits(hf)
    keep = torch.ones(llm.engine.runner.info.vocab_size, dtype=torch.bool)
    keep[list(llm.control.ids)] = False  # the APAR rules edit these columns
    after = 0
    for thread, n, row in rec.rows:
        diff = (row[keep] - ref[oracle.row(thread, n)][keep]).abs().max().item()
        assert diff < atol, f"thread {thread.thread_id} at context {n}: max diff {diff}"
        after += any(j.index <= n - 1 for j in thread.joins)
    return len(rec.rows), after


def two_groups(llm, **params):
    rec = LogitsRecorder()
    force = ForceForks(llm.control, **TWO_GROUPS)
    sp = SamplingParams(max_tokens=300, join=True, logits_rules=[rec, force], **{**MECHANICS, **params})
    out = llm.generate("Tell me about the sea.", sp)[0]
    return out, rec


def test_after_a_join_the_parent_sees_every_branch_on_the_tiny_model(tiny_llm, tiny_dir):
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    out, rec = two_groups(tiny_llm)
    assert out.finish_reason == "stop" and out.num_threads == 5
    root = next(t for t, _, _ in rec.rows if t.parent is None)
    assert [j.index - root.own_start for j in root.joins] == [12, 24]
    # The shape the bench reads: two joins, one level of children, the root's own tokens as
    # the spine, and a child's 8 tokens ([Child], 6 forced, its end token) as the longest branch.
    assert out.shape == TreeShape(joins=2, depth=2, spine_tokens=len(root.own_tokens), longest_branch_tokens=8)
    checked, after = check_rows(tiny_llm, hf, rec, atol=1e-4)
    assert after >= 10  # the root after each join, and the second group's children (they inherit the first join)
    # Positions after a join continue from the longest branch (the children write 7 own tokens each).
    first = root.joins[0]
    assert first.index + first.offset == max(c.position(len(c.token_ids) - 2) for c in first.children) + 1
    tiny_llm.check_idle()


def test_a_joined_answer_restores_in_reading_order_without_the_join(tiny_llm):
    out, rec = two_groups(tiny_llm)
    threads = {t.thread_id: t for t, _, _ in rec.rows}
    root = next(t for t in threads.values() if t.parent is None)
    ct = tiny_llm.control
    expect = []
    for i, token in enumerate(root.own_tokens):
        if token == ct.fork_id:
            expect += [x for x in root.children[i].own_tokens if x not in (ct.child_id, *ct.eos_ids)]
        elif token not in (ct.join_id, *ct.eos_ids):
            expect.append(token)
    assert out.token_ids == expect and ct.join_id not in out.token_ids
    tiny_llm.check_idle()


def test_a_request_without_join_decodes_exactly_as_before(tiny_llm):
    """join=False: [Join] is banned for the model, children free their KV as they finish."""
    force = ForceForks(tiny_llm.control, frozenset({3, 8}), child_tokens=6, root_tokens=20)
    params = SamplingParams(max_tokens=200, logits_rules=[force], **MECHANICS)
    plain = tiny_llm.generate("Tell me about the sea.", params)[0]
    rec = LogitsRecorder()
    again = tiny_llm.generate("Tell me about the sea.", SamplingParams(max_tokens=200, logits_rules=[rec, force], **MECHANICS))[0]
    assert again.token_ids == plain.token_ids
    assert all(row[tiny_llm.control.join_id] == float("-inf") for _, _, row in rec.rows)
    tiny_llm.check_idle()


def test_a_forced_join_without_join_on_is_a_clear_error(tiny_llm):
    force = ForceForks(tiny_llm.control, frozenset({3}), child_tokens=4, root_tokens=20, join_after=frozenset({6}))
    out = tiny_llm.generate("Hi", SamplingParams(max_tokens=100, logits_rules=[force], **MECHANICS))[0]
    assert out.finish_reason == "error" and "join" in out.error
    tiny_llm.check_idle()


def test_join_holds_the_branches_kv_until_the_join_and_frees_it_after(tiny_llm):
    """Cost on a forced tree: a joined answer holds more KV (branches live until the join, then
    as long as the parent attends to them) and takes one step more per join than the same
    tree without joins."""
    out, _ = two_groups(tiny_llm)
    force = ForceForks(tiny_llm.control, TWO_GROUPS["fork_after"], child_tokens=6, root_tokens=28)
    fork_only = tiny_llm.generate("Tell me about the sea.", SamplingParams(max_tokens=300, logits_rules=[force], **MECHANICS))[0]
    assert out.peak_kv_blocks > fork_only.peak_kv_blocks
    assert out.num_steps > fork_only.num_steps
    tiny_llm.check_idle()


def test_after_a_join_the_parent_sees_every_branch_on_the_hf_fallback(tiny_dir, tiny_llm):
    """The slow HF backend recomputes every step from what each key saw: the same oracle."""
    llm = LLM(str(tiny_dir), backend="hf", dtype="float32", num_kv_blocks=64, block_size=4)
    out, rec = two_groups(llm)
    assert out.finish_reason == "stop" and out.num_threads == 5
    checked, after = check_rows(llm, _tiny_hf(tiny_dir, llm.tokenizer), rec, atol=1e-4)
    assert after >= 10
    assert out.token_ids == two_groups(tiny_llm)[0].token_ids  # and the torch engine's answer
    llm.check_idle()


@pytest.mark.model
def test_after_a_join_the_parent_sees_every_branch_on_the_bundled_model(base_dir):
    llm = LLM("bundled", dtype="float32", num_kv_blocks=256, block_size=16)
    hf = models.load_hf_model(base_dir, llm.tokenizer, torch.float32, adapter=llm.adapter)
    out, rec = two_groups(llm, frequency_penalty=0.0)  # the recorded rows are the model's own
    assert out.num_threads == 5
    checked, after = check_rows(llm, hf, rec, atol=1e-4)
    assert after >= 10
    llm.check_idle()


def test_after_a_join_the_parent_sees_every_branch_on_llamacpp(tiny_dir):
    """The same oracle on llama.cpp (f32 GGUF of the tiny model): a join is seq_cp of each
    child's own cells into the parent's sequence; positions repeat across branches."""
    hf = models.load_hf_model(tiny_dir, LLM(str(tiny_dir), dtype="float32", num_kv_blocks=16, block_size=4).tokenizer, torch.float32)
    llm = LLM(str(tiny_dir), backend="llamacpp", quant="f32", cpu_threads=1, num_kv_blocks=256, block_size=4)
    out, rec = two_groups(llm)
    assert out.finish_reason == "stop" and out.num_threads == 5
    checked, after = check_rows(llm, hf, rec, atol=1e-4)
    assert after >= 10
    llm.check_idle()
    assert not llm.engine.runner.live


class TreePlan:
    """A logits rule that forks, joins and ends threads as drawn: thread k (in birth order)
    forks after the own-token counts in `forks[k]`, joins after those in `joins[k]`, and
    ends after `ends[k]` own tokens."""

    def __init__(self, control, forks, joins, ends) -> None:
        self.control, self.forks, self.joins, self.ends = control, forks, joins, ends

    def __call__(self, thread, logits) -> None:
        from parafork.rules import force_token

        k = thread.request.threads.index(thread)
        n = len(thread.own_tokens) - (thread.parent is not None)  # not counting [Child]
        if n >= self.ends[k % len(self.ends)]:
            force_token(logits, min(self.control.eos_ids))
        elif n in self.joins[k % len(self.joins)]:
            force_token(logits, self.control.join_id)
        elif n in self.forks[k % len(self.forks)] and logits[self.control.fork_id] != float("-inf"):
            force_token(logits, self.control.fork_id)


counts = st.frozensets(st.integers(1, 14), max_size=3)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    forks=st.lists(counts, min_size=1, max_size=4),
    joins=st.lists(counts, min_size=1, max_size=4),
    ends=st.lists(st.integers(4, 18), min_size=1, max_size=4),
    blocks=st.sampled_from([24, 40, 256]),  # small pools preempt (more so without an admission reserve)
    reserve=st.sampled_from([0.0, 1.0]),
    abort_after=st.integers(0, 40),
    stop=st.booleans(),
    serial=st.booleans(),
)
def test_random_trees_with_joins_leak_nothing_and_attend_as_the_oracle_says(
    recorded, tiny_dir, forks, joins, ends, blocks, reserve, abort_after, stop, serial
):
    llm = recorded(num_kv_blocks=blocks, admission_reserve=reserve)
    hf = _tiny_hf(tiny_dir, llm.tokenizer)
    recs, ids = [], []
    for i in range(3):
        rec = LogitsRecorder()
        plan = TreePlan(llm.control, forks, joins, ends)
        params = SamplingParams(max_tokens=120, join=True, max_depth=3, max_threads=12, mode="serial" if serial and i == 2 else "apar",
                                stop=("\u00a7\u00a7",) if stop else (), logits_rules=[rec, plan], **MECHANICS)
        ids.append(llm.add_request({"prompt_token_ids": list(range(400 + 5 * i, 413 + 5 * i))}, params))
        recs.append(rec)
    ended: dict[str, str] = {}
    steps = 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                ended[out.request_id] = out.finish_reason
        steps += 1
        if steps == abort_after and ids[1] not in ended:
            llm.abort(ids[1])
            ended[ids[1]] = "abort"
        assert steps < 2000
    assert not llm.engine.runner.live
    llm.check_idle()  # every block and sequence id back, after joins, preemption and aborts
    for rid, rec in zip(ids, recs):
        if ended.get(rid) == "stop" and rec.rows:  # ended by itself: its whole tree was computed
            check_rows(llm, hf, rec, atol=1e-4)


def test_joins_are_made_again_after_a_preemption(recorded, tiny_dir):
    """Three two-group answers on a pool that holds about one: requests are preempted after
    their joins, recompute their finished children, make the joins again, and still attend
    exactly as the oracle says."""
    llm = recorded(num_kv_blocks=30, admission_reserve=0)
    hf = _tiny_hf(tiny_dir, llm.tokenizer)
    recs = [LogitsRecorder() for _ in range(3)]
    force = ForceForks(llm.control, **TWO_GROUPS)
    for i, rec in enumerate(recs):
        llm.add_request({"prompt_token_ids": list(range(600 + 7 * i, 616 + 7 * i))},
                        SamplingParams(max_tokens=300, join=True, logits_rules=[rec, force], **MECHANICS))
    outs = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                outs[out.request_id] = out
    assert sum(o.num_preemptions for o in outs.values()) > 0
    assert all(o.finish_reason == "stop" and o.num_threads == 5 for o in outs.values())
    assert len(llm.engine.runner.joins) > 6  # two joins per answer, and again after preemptions
    for rec in recs:
        check_rows(llm, hf, rec, atol=1e-4)
    llm.check_idle()


_HF = {}


def _tiny_hf(tiny_dir, tokenizer):
    if "hf" not in _HF:
        _HF["hf"] = models.load_hf_model(tiny_dir, tokenizer, torch.float32)
    return _HF["hf"]


class _Thread:
    """What TreeOracle reads of an engine thread, for a training tree's thread."""

    def __init__(self, token_ids, own_start, parent) -> None:
        self.token_ids, self.own_start, self.parent = token_ids, own_start, parent
        self.children, self.joins = {}, []


class _Join:
    def __init__(self, owner, index, children) -> None:
        self.owner, self.index, self.children = owner, index, children


def _as_engine_threads(threads):
    """The training threads (data/samples.py) as engine-shaped threads: full contexts, the
    parent's [Fork] found by token (not by the packer's positions), joins by index."""
    out = []
    for t in threads:
        if t.parent is None:
            node = _Thread(list(t.tokens), t.first_label + 1, None)
        else:
            parent = out[t.parent]
            forks = [i for i, x in enumerate(parent.token_ids) if x == FORK_ID[0] and i >= parent.own_start]
            fork = forks[sum(1 for c in parent.children.values())]  # children are born in order
            node = _Thread(parent.token_ids[: fork + 1] + list(t.tokens), fork + 1, parent)
            parent.children[fork - parent.own_start] = node
        out.append(node)
    for t, node in zip(threads, out):
        base = 0 if node.parent is None else node.own_start
        node.joins = [_Join(node, base + j.index, [out[c] for c in j.children]) for j in t.joins]
    return out


FORK_ID = [None]


def test_training_packs_a_joined_tree_as_the_engine_attends(tiny_llm, tiny_dir):
    """The packed loss of a tree with two joins equals the sum of per-token losses from the
    oracle's forward over the same tree (the rules the engine is tested against)."""
    import torch.nn.functional as F

    from parafork.data.extract import JOIN, Node
    from parafork.data.samples import IGNORE, pack, tree_threads
    from parafork.train import sample_loss

    hf = _tiny_hf(tiny_dir, tiny_llm.tokenizer)
    ct = tiny_llm.control
    FORK_ID[0] = ct.fork_id
    tree = Node(["Two tips:\n\n1. Sleep:", Node([" go to bed early, every night."]), "\n2. Eat:",
                 Node([" fruit and", Node([" vegetables,"]), " daily."]), "\n\n", JOIN,
                 "Both help.\n3. Walk:", Node([" thirty minutes outside."]), JOIN, " That is all."])
    assert Node.from_json(tree.to_json()) == tree and "JOIN" not in tree.text()
    threads = tree_threads(models.apply_chat_template(tiny_llm.tokenizer, "Tips?"), tree, tiny_llm.tokenizer, ct)
    sample = pack(threads)
    assert [len(t.joins) for t in threads] == [2, 0, 0, 0, 0] and (sample.input_ids == ct.join_id).sum() == 2
    loss, count = sample_loss(hf, sample)

    engine_like = _as_engine_threads(threads)
    oracle = TreeOracle(engine_like[0])
    ref = oracle.logits(hf)
    total, n = 0.0, 0
    for t, node in zip(threads, engine_like):
        base = 0 if node.parent is None else node.own_start
        for k in range(len(t.tokens) - 1):
            if k >= t.first_label:
                row = ref[oracle.row(node, base + k + 1)]
                total += F.cross_entropy(row[None], torch.tensor([t.tokens[k + 1]]), reduction="sum").item()
                n += 1
    assert count == n == int((sample.labels != IGNORE).sum())
    assert abs(loss.item() - total) < 1e-4 * max(1.0, total)


@pytest.mark.model
def test_after_a_join_the_parent_sees_every_branch_on_llamacpp_with_the_bundled_model(base_dir):
    """The bundled model exported to an f32 GGUF (llama.cpp's converter, once into the cache)."""
    llm = LLM("bundled", backend="llamacpp", quant="f32", cpu_threads=2, num_kv_blocks=256, block_size=16)
    hf = models.load_hf_model(base_dir, llm.tokenizer, torch.float32, adapter=llm.adapter)
    out, rec = two_groups(llm, frequency_penalty=0.0)
    assert out.num_threads == 5
    checked, after = check_rows(llm, hf, rec, atol=1e-4)
    assert after >= 10
    llm.check_idle()


def test_joins_with_every_policy_on_speculation_logprobs_and_n(tiny_llm):
    """Budget planning and the head guard on (the defaults), n-gram drafts, logprobs and two
    requests of one prompt side by side (what the server's n=2 queues): a joined tree still finishes, drafts change no token (greedy), the
    logprobs restore one per token in reading order, and the pools end empty."""
    force = ForceForks(tiny_llm.control, **TWO_GROUPS)
    prompt = "Tell me about the sea."
    base = SamplingParams(max_tokens=300, join=True, logits_rules=[force], logprobs=1)
    plain = tiny_llm.generate([prompt, prompt], base)
    drafted = tiny_llm.generate([prompt, prompt], SamplingParams(**{**base.__dict__, "speculative": "ngram"}))
    for a, b in zip(plain, drafted):
        assert a.token_ids == b.token_ids and a.num_threads == b.num_threads == 5
        assert len(a.logprobs) == len(a.token_ids) and tiny_llm.control.join_id not in a.token_ids
    assert sum(o.num_draft_tokens for o in drafted) > 0
    tiny_llm.check_idle()
