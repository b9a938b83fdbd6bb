"""The engine: requests in, one batched forward per step, restored token outputs out.

One step is four phases:
- schedule: the scheduler picks every live thread's pending tokens (and admits, preempts
  or fails requests to fit the KV pool);
- run: the runner computes each scheduled slice's last-token logits in one forward (threads
  that speculate also feed a draft and get logits at each of its positions: speculation.py);
- sample: the APAR rules, the request's own logits rules, then one token per thread (and the
  draft tokens that the samples agree with);
- account: a sampled `[Fork]` starts a child thread (sharing the parent's KV blocks), a
  `[Join]` parks its thread until its children are done, an end token finishes its thread
  and frees its blocks at once (unless a join may still read them), and requests that ran
  out of budget or threads finish.

Before the schedule, joins whose children are done are put in place (`_make_joins`): the
joining thread takes references to the children's blocks, the runner is told (`join`), and
the children are released.

**Deferred forks.** A fork gives the child the parent's cached KV at once, so in the next
step the child feeds `[Fork]` and `[Child]` while the parent feeds the same `[Fork]`: two
rows for one token's K/V. In a step of at least `EngineConfig.defer_forks_from_rows` rows
(by default every step) the fork is deferred instead: the child
(`Thread.fork_deferred`) holds nothing and is not scheduled until its parent has fed the
`[Fork]`; right after that forward the parent's KV through the `[Fork]` is forked to it and
it feeds `[Child]` alone. The text is the same (the child's context is), one row is saved
per fork (~1.2% of an APAR answer's rows on Vicuna: 92 forks in 7,614 decode rows), and the
child's body starts one step later, which costs nothing in throughput and little in latency
(16 clients, deferred from 16 rows vs never: p50 6.59 vs 6.62 s, results/load). Where rows
are dear every row counts (a Zen 4: 8 rows cost 1.5x one, 16 rows 2.2x, results/steps); where
they are nearly free (the Zen 5: 16 rows 1.22x one) the saved row is worth little and the
step costs nothing either. The rule is fixed, not read from the machine's step timings: under
a shared `max_tokens` the threads' pace decides which thread writes the last tokens, so a
threshold that followed timings would make an answer's text depend on them.

The engine speaks token ids only; `LLM` (parafork/llm.py) adds prompts and text. Every
sequence id the engine hands to the runner is released exactly once, and when no request
is left every KV block and sequence id is back in its pool (`check_idle`).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..config import EngineConfig, cache_dir
from ..restore import linearize, restore_origins
from ..sampling import FORKING_MODES, SamplingParams
from ..tokens import ControlTokens
from . import speculation, step_cost
from .block_manager import BlockManager
from .runner import JoinSource, KVSpan, Runner, SequenceSlice
from .sampler import apply_apar_rules, apply_penalties, model_logprobs, sample, token_logprob
from .scheduler import ScheduledBatch, Scheduler
from .thread import FinishReason, Join, Request, RequestTimes, Thread, TreeShape


@dataclass
class RequestOutput:
    request_id: str
    text: str  # restored answer in reading order (streaming: final text so far; else set when finished)
    delta: str  # text that became final since the previous output of this request
    token_ids: list[int]  # restored answer tokens, no control tokens
    finished: bool
    finish_reason: str | None
    num_generated_tokens: int  # over all threads, control tokens included
    num_steps: int  # forward passes the request took part in (decode steps)
    num_threads: int
    peak_kv_blocks: int
    num_prompt_tokens: int
    attention_work: int = 0  # sum over fed tokens of the KV length each attends to
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0  # tokens fed again after preemptions (prefix-cache hits not counted)
    num_serialized_steps: int = 0  # steps its threads ran one at a time for lack of KV (scheduler.py)
    num_deferred_forks: int = 0  # forks whose child got its KV a step later, rows being dear (module docstring)
    num_draft_tokens: int = 0  # speculative draft tokens fed (engine/speculation.py)
    num_accepted_tokens: int = 0  # of which the model's own samples agreed with
    num_head_draft_tokens: int = 0  # of the drafts, those from a trained head (the rest: lookup)
    num_head_accepted_tokens: int = 0
    num_sibling_tokens: int = 0  # of the head's drafts, siblings fed beside its chains (a tree)
    num_accepted_sibling_tokens: int = 0
    # Per draft position j: drafts fed that reached it, and how many were accepted there.
    drafted_at: tuple[int, ...] = ()
    accepted_at: tuple[int, ...] = ()
    error: str | None = None
    complete: bool = False  # token_ids hold the whole tree (no thread may add tokens before their end)
    # With SamplingParams.logprobs: per restored token, (log-probability, [(token, log-probability)] top).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    shape: TreeShape | None = None  # joins, depth, spine and longest branch (thread.TreeShape)
    # When it was added, first scheduled, first token, finished: the request's own record (no copy),
    # complete once the request has finished, whichever way it ended (a stop string's abort too).
    times: RequestTimes | None = None


class _Proposal(NamedTuple):
    """A thread's draft before the step sizes it (`Engine._draft`)."""

    index: int  # the thread's place in the batch
    thread: Thread
    tokens: list[int]  # the chain
    gains: list[float]  # each token's chance to be accepted, all before it accepted too
    by_head: bool  # a trained head's (else lookup's)
    dists: list  # where the head drew the tokens (sampled requests): their distributions
    siblings: list[tuple[int, int, float]]  # (depth, token, chance): the head's other tokens per position


@dataclass(frozen=True)
class EngineStats:
    """A snapshot, taken on the engine's own thread; safe to hand to other threads."""

    requests_waiting: int
    requests_running: int
    threads_live: int
    sequences_live: int
    kv_blocks_total: int
    kv_blocks_free: int
    steps_total: int
    requests_total: int
    generated_tokens_total: int
    forks_total: int
    prefix_cache_hit_tokens_total: int
    draft_tokens_total: int = 0
    accepted_draft_tokens_total: int = 0
    head_draft_tokens_total: int = 0  # of the drafts, those from a trained head (the rest: lookup)
    head_accepted_draft_tokens_total: int = 0
    joins_total: int = 0
    preemptions_total: int = 0
    recomputed_tokens_total: int = 0
    serialized_steps_total: int = 0  # request-steps run one thread at a time for lack of KV
    deferred_forks_total: int = 0  # forks whose child got its KV a step later (engine.py)
    growth_ratio: float = 0.0  # admission's estimate of the budget left that becomes KV (scheduler.py)


class Engine:
    def __init__(self, config: EngineConfig, runner: Runner, control: ControlTokens,
                 sampling_defaults: dict[str, float] | None = None, head_guard=None, drafter=None) -> None:
        """`sampling_defaults`: what a request that leaves a penalty, `join` or `max_depth` unset
        (None) gets (the model's generation_config.json); `head_guard`: the logits rule that
        requests with `no_repeat_heads` get in forking modes (`rules.NoRepeatedHeads`). Both
        are the engine's request policy, applied once, in `add`, whoever adds the request.
        `drafter`: an `eagle.HeadDrafter` for requests that speculate with "eagle"."""
        info = runner.info
        if config.max_model_len and config.max_model_len > info.max_position:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's {info.max_position} positions")
        config.max_model_len = config.max_model_len or info.max_position
        if config.prefix_caching and not info.prefix_caching:
            config.prefix_caching = False
        self.config = config
        self.runner = runner
        self.control = control
        self.sampling_defaults = dict(sampling_defaults or {})
        self.head_guard = head_guard
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.prefix_caching, info.paged)
        self.scheduler = Scheduler(self.block_manager, config.max_batch_tokens, info.max_live_sequences,
                                   admission_reserve=config.admission_reserve)
        self.seq_ids = self.scheduler.seq_ids
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.total_steps = 0
        self._counts = {"requests": 0, "tokens": 0, "forks": 0, "joins": 0, "drafted": 0, "accepted": 0, "recomputed": 0,
                        "deferred_forks": 0, "head_drafted": 0, "head_accepted": 0}
        # The cost of a step against its rows (sizes drafts: step_cost.py), measured
        # here, before any request, where the runner allows it.
        self.step_cost = self._step_cost()
        if drafter is not None and self.step_cost.source == "measured":
            # The head's pass priced as timed here, in one-row steps (its weight bytes alone, the
            # facade's estimate, left out its threads' share: 64 threads cost 19 ms, not 5).
            base, per_thread = drafter.time_pass()
            drafter.pass_cost, drafter.thread_cost = base / self.step_cost.ms[0], per_thread / self.step_cost.ms[0]
        self.defer_forks_from_rows = config.defer_forks_from_rows
        self._rows_dear = False  # this step's rows reach defer_forks_from_rows
        self.drafter = drafter  # drafts from a trained head (eagle.py), None without one
        # Threads the head drafted for this step, its tokens fed, accepted; its drawn siblings fed, taken.
        self._head_step: list[int] | None = None
        self._hidden = None  # this step's StepHidden where the drafter reads it, and each thread's first row
        self._taken: dict[int, int] = {}  # thread id -> the row (from its slice's end) of a sibling taken this step

    def _step_cost(self) -> step_cost.StepCost:
        info, config = self.runner.info, self.config
        if config.step_cost == "fixed" or not info.timed_steps:
            return step_cost.StepCost.linear(info.draft_row_cost)
        key = step_cost.cache_key(self.runner, config.torch_dtype, config.backend)
        return step_cost.cached(cache_dir() / "step_cost.json", key,
                                lambda: step_cost.measure(self.runner, config.num_kv_blocks, config.block_size))

    # ---- requests -------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> None:
        """Queues a request, its params resolved here (the model's defaults, the head guard).
        With `stream=False` its outputs carry tokens only once it has finished, which spares
        restoring the growing tree at every step."""
        params = params.with_defaults(self.sampling_defaults)
        if params.speculative is None and self.config.speculative:
            params = replace(params, speculative=self.config.speculative)  # the engine's default, decided once
        if params.speculative == "eagle" and self.drafter is None:
            raise ValueError("speculative='eagle' needs a draft head: start the engine with draft_head (or "
                             "speculative='eagle', which loads the bundled one)")
        if (problem := params.drafting_problem()) is not None:
            raise ValueError(problem)
        params = params.with_draft_defaults()
        if params.no_repeat_heads and params.mode in FORKING_MODES and self.head_guard is not None:
            params = replace(params, logits_rules=(*params.logits_rules, self.head_guard))
        vocab = self.runner.info.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if not all(isinstance(i, int) and 0 <= i < vocab for i in prompt_ids):
            raise ValueError("prompt_token_ids must be token ids of this model's vocabulary")
        if len(prompt_ids) >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the model takes at most {self.config.max_model_len - 1}"
            )
        if -(-(len(prompt_ids) + 1) // self.config.block_size) > self.config.num_kv_blocks:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than the whole KV pool holds")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias names a token id beyond the vocabulary ({vocab})")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not self.runner.info.control_tokens and params.mode in FORKING_MODES:
            raise ValueError(
                f"this model's vocabulary has no [Fork]/[Child] tokens: mode={params.mode!r} needs them; use mode='ar' "
                "(or a model exported with them: parafork export --gguf)"
            )
        request = Request(request_id, prompt_ids, params, next(self._arrivals))
        request.streaming = stream
        self.requests[request_id] = request
        self.scheduler.add(request)
        self._counts["requests"] += 1

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Ends a request now (cancelled, or `STOP` when its text reached a stop string); its
        KV blocks and sequence ids return to their pools at once."""
        request = self.requests.pop(request_id, None)
        if request is not None and not request.finished:
            self._finish_request(request, reason)

    def request_tree(self, request_id: str) -> Thread | None:
        """The root thread of a live request, for display on the engine's own thread (the demo's
        live view); None once the request has ended. Callers must not change it."""
        request = self.requests.get(request_id)
        return request.root if request is not None else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            requests_waiting=len(self.scheduler.waiting),
            requests_running=len(self.scheduler.running),
            threads_live=sum(len(r.live_threads) for r in self.scheduler.running),
            sequences_live=len(self.seq_ids.live),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free,
            steps_total=self.total_steps,
            requests_total=self._counts["requests"],
            generated_tokens_total=self._counts["tokens"],
            forks_total=self._counts["forks"],
            prefix_cache_hit_tokens_total=bm.hit_tokens,
            draft_tokens_total=self._counts["drafted"],
            accepted_draft_tokens_total=self._counts["accepted"],
            head_draft_tokens_total=self._counts["head_drafted"],
            head_accepted_draft_tokens_total=self._counts["head_accepted"],
            joins_total=self._counts["joins"],
            preemptions_total=self.scheduler.num_preemptions,
            recomputed_tokens_total=self._counts["recomputed"],
            serialized_steps_total=self.scheduler.num_serialized_steps,
            deferred_forks_total=self._counts["deferred_forks"],
            growth_ratio=self.scheduler.growth_ratio,
        )

    def check_idle(self) -> None:
        """With no request left, every KV block and every sequence id is free."""
        assert not self.scheduler.has_work, "requests are still queued or running"
        bm = self.block_manager
        assert bm.num_free == bm.num_blocks, f"{bm.num_blocks - bm.num_free} KV blocks still held"
        assert not self.seq_ids.live, f"sequence ids still live: {sorted(self.seq_ids.live)}"
        bm.check_invariants()

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward over all scheduled threads; outputs of the requests it touched."""
        self._step_started = time.monotonic()
        self._make_joins()
        batch, failed = self.scheduler.schedule()
        touched = {r.request_id: r for r in failed}
        for request in failed:
            self._finish_request(request, request.finish_reason)
        self._release_sequences()
        if batch.threads:
            self._draft(batch)
            fed = sum(batch.num_tokens) + sum(t.draft_rows for t in batch.threads)  # the forward's query rows
            limit = self.defer_forks_from_rows
            self._rows_dear = limit is not None and fed >= limit
            logits = self._run(batch)
            rows, ready = self._advance(batch)
            if ready:
                self._sample(logits, rows, ready)
            if self._hidden is not None:
                self._observe(batch)
            if self._head_step is not None:
                self.drafter.record(*self._head_step)
                self._head_step = None
            for thread in batch.threads:
                touched[thread.request.request_id] = thread.request
        now = time.monotonic()
        return [self._account(request, now) for request in touched.values()]

    @staticmethod
    def _speculates(thread: Thread) -> str | None:
        """The thread's drafting method ("ngram", "eagle"; the engine's default is put in at
        `add`), None if it does not draft."""
        method = thread.request.params.speculative
        return None if method in (None, "off") else method

    def _draft(self, batch: ScheduledBatch) -> None:
        """Drafts for the threads that sample this step and speculate (speculation.py); a
        trained head's for all its threads at once (eagle.py)."""
        sampling, proposals, asks = 0, [], []
        rows = fixed = sum(batch.num_tokens)  # fixed: rows that make no token this step (prompt chunks)
        for i, (thread, n) in enumerate(zip(batch.threads, batch.num_tokens)):
            if n != len(thread.pending):
                continue
            sampling, fixed = sampling + 1, fixed - n
            if not self._speculates(thread) or self._deferred_child(thread, len(thread.token_ids)) is not None:
                continue  # (a deferred child takes the parent's KV through its [Fork], no draft after it)
            request, params = thread.request, thread.request.params
            # Room for every draft token to be accepted and one more sampled after them.
            room = min(request.tokens_left, self.config.max_model_len - len(thread.token_ids)) - 1
            k = min(params.num_draft_tokens, room)
            # Lookup first, with a head too: where the context recurs its drafts are accepted more
            # often than the head's and cost no pass (Vicuna, 9 questions: 47% against 27-30%).
            draft = speculation.propose(thread, k, self.control)
            if draft:
                gains = speculation.chain_gains(thread.draft_stats.acceptance, len(draft))
                proposals.append(_Proposal(i, thread, draft, gains, False, [], []))
            elif self._speculates(thread) == "eagle" and not thread.spans:
                asks.append((i, thread, k))  # (positions moved by a join: the head's cache does not hold them)
        decode_cost = speculation.decode_cost(self.step_cost, rows, fixed)
        if asks and self._head_pays(asks, rows, sampling, decode_cost):
            # A head's token is worth computing where its chance beats its price: its row and its
            # share of the head's passes (one-row steps), against the tokens per cost the step makes.
            min_gain = (self.step_cost.marginal(rows) + self._pass_price(len(asks)) / len(asks)) * sampling / decode_cost
            sibling_gain = self.step_cost.marginal(rows) * sampling / decode_cost  # (a sibling costs no pass: its row)
            # Sampled requests' drafts are drawn from the head's distribution (sampler.settle_offer).
            draws = [None if t.request.params.greedy else (t.request.params.temperature, t.generator) for _, t, _ in asks]
            trees = self.runner.info.tree_slices
            siblings = [t.request.params.num_draft_siblings if trees else 0 for _, t, _ in asks]
            drafts = self.drafter.propose([(t.thread_id, t.token_ids, k) for _, t, k in asks], min_gain, draws, siblings,
                                          sibling_gain)
            proposals += [_Proposal(i, t, d.tokens, d.gains, True, d.dists, d.siblings)
                          for (i, t, _), d in zip(asks, drafts) if d.tokens]
            proposals.sort(key=lambda p: p.index)
            self._head_step = [len(asks), 0, 0, 0, 0]
        elif asks:
            self.drafter.rest()
        if not proposals:
            return
        # A draft's tokens and siblings in order of chance (its chain first where equal): a
        # sibling's chance is below its parent's and its chain neighbour's, so any number of
        # the first ones is a chain and siblings whose parents are in it.
        nodes = [sorted([(g, None) for g in p.gains] + [(g, (d, t)) for d, t, g in p.siblings], key=lambda x: -x[0])
                 for p in proposals]
        lengths = speculation.draft_lengths([[g for g, _ in ns] for ns in nodes], sampling, rows, self.step_cost, fixed)
        for p, ns, n in zip(proposals, nodes, lengths):
            thread = p.thread
            if not n:
                thread.draft_stats.idle()
                continue
            chain = p.tokens[:sum(s is None for _, s in ns[:n])]
            # (A sampled request's siblings were drawn after the chain's token at their position:
            # they are settled with it, so none goes where that token is not fed.)
            reach = len(chain) - bool(p.dists)
            siblings = [s for _, s in ns[:n] if s is not None and s[0] <= reach]
            fed = self.scheduler.add_draft(batch, p.index, chain + [t for _, t in siblings])
            thread.draft = fed[:len(chain)]
            thread.draft_siblings = siblings[:len(fed) - len(thread.draft)]
            thread.draft_by_head = p.by_head
            thread.draft_dists = p.dists[:len(thread.draft)]

    def _head_pays(self, asks: list, rows: int, sampling: int, decode_cost: float) -> bool:
        """Whether the head's pass is worth running this step: what it has been yielding per
        thread (its accepted tokens, each worth what a token costs in this step, less the rows its
        drafts add) against the pass over these threads (timed: `_pass_price`). Where rows are dear
        (a wide batch) few of its tokens can pay for their rows and its pass is dear (its threads'
        attention), its yield falls and it sits out; its threads' caches catch up later in one
        pass of several rows. (Measured at 16 clients: the head running every step cost APAR 8%
        of its tokens/s.)"""
        worth = decode_cost / sampling  # one-row steps per token the step makes (its prompt chunks aside)
        fed, accepted = self.drafter.expected_yield
        return len(asks) * (accepted * worth - fed * self.step_cost.marginal(rows)) > self._pass_price(len(asks))

    def _pass_price(self, threads: int) -> float:
        """A pass of the head over `threads` threads, in one-row steps."""
        return self.drafter.pass_cost + self.drafter.thread_cost * (threads - 1)

    def _observe(self, batch: ScheduledBatch) -> None:
        """Hands the drafter the target's hidden states of every verified position fed this step."""
        aux, first = self._hidden
        self._hidden = None
        taken, self._taken = self._taken, {}
        for thread, (row, start, fed) in zip(batch.threads, first):
            verified = thread.num_cached - start  # (< 0 where the thread ended this step and gave back its KV)
            if self._speculates(thread) == "eagle" and not thread.request.finished and verified > 0:
                self.drafter.observe(thread.thread_id, start, thread.token_ids[start:start + verified],
                                     aux[row:row + verified])
                if thread.thread_id in taken:  # a sibling taken: its row's features, its position is next
                    at = row + fed - taken[thread.thread_id]
                    self.drafter.observe(thread.thread_id, thread.num_cached,
                                         thread.token_ids[thread.num_cached:thread.num_cached + 1], aux[at:at + 1])

    def _make_joins(self) -> None:
        """Puts in place every join whose thread has fed up to its `[Join]` and whose children
        are done (finished, their KV whole): after a thread sampled `[Join]`, or again after a
        preemption made the request recompute."""
        for request in self.scheduler.running:
            if not request.params.joins or all(t.established == len(t.joins) for t in request.threads):
                continue  # no join to make (the common case: checked without walking the tree)
            made = False
            for thread in request.kv_threads:
                k = thread.established
                if k == len(thread.joins) or thread.seq_id is None or thread.num_cached != thread.joins[k].index:
                    continue
                join = thread.joins[k]
                if all(c.finished and c.seq_id is not None and c.established == len(c.joins)
                       and c.num_cached == len(c.token_ids) - 1 for c in join.children):
                    self._make_join(thread, join)
                    made = True
            if made:
                self.scheduler.release_unneeded(request)
                self._release_sequences()

    def _make_join(self, thread: Thread, join: Join) -> None:
        if join.offset is None:  # first made: the position after everything it attends to
            before = thread.position(join.index - 1) + 1
            join.offset = max([before] + [c.position(c.num_cached - 1) + 1 for c in join.children]) - join.index
            self._counts["joins"] += 1
        spans = []
        for child in join.children:
            spans.append((join, KVSpan(tuple(child.block_table), child.own_start, child.num_cached)))
            spans += [(join, span) for j, span in child.spans if j.owner is child]
        self.block_manager.attach(thread, spans)
        self.runner.join(thread.seq_id, [JoinSource(c.seq_id, c.position(c.own_start)) for c in join.children])
        thread.established += 1

    def _run(self, batch: ScheduledBatch):
        slices = [
            SequenceSlice(t.seq_id, t.pending[:n] + t.draft + [token for _, token in t.draft_siblings], t.num_cached,
                          t.block_table, 1 + t.draft_rows, t.position(t.num_cached) - t.num_cached,
                          tuple(span for _, span in t.spans), self._tree(t, n))
            for t, n in zip(batch.threads, batch.num_tokens)
        ]
        self.total_steps += 1
        if self.drafter is None or not any(self._speculates(t) == "eagle" for t in batch.threads):
            self._hidden = None
            return self.runner.forward(slices)
        out = self.runner.forward_hidden(slices, self.drafter.layers)
        first, rows = [], 0
        for t, s in zip(batch.threads, slices):
            first.append((rows, t.num_cached, len(s.token_ids)))
            rows += len(s.token_ids)
        self._hidden = (out.aux, first)
        return out.logits

    @staticmethod
    def _tree(thread: Thread, n: int) -> tuple[int, ...]:
        """The slice's parents where the draft has siblings (runner.SequenceSlice): the fed tokens
        and the draft a chain, a sibling of draft token j after the token before it."""
        if not thread.draft_siblings:
            return ()
        return tuple(range(-1, n + len(thread.draft) - 1)) + tuple(n - 1 + j for j, _ in thread.draft_siblings)

    def _advance(self, batch: ScheduledBatch) -> tuple[list[int], list[Thread]]:
        """Marks the fed tokens cached; the threads whose whole context is now fed sample.
        Returns each of those threads' first logits row, and the threads."""
        rows, ready, row = [], [], 0
        for thread, n in zip(batch.threads, batch.num_tokens):
            fed = n + thread.draft_rows
            # Token k (0-based position) attends to k + 1 keys; this slice holds positions c..c+fed-1.
            joined = sum(span.end - span.start for _, span in thread.spans)
            thread.request.attention_work += fed * (thread.num_cached + joined) + fed * (fed + 1) // 2
            redo = max(0, min(thread.num_cached + n, thread.recompute_until) - thread.num_cached)
            thread.request.num_recomputed_tokens += redo
            self._counts["recomputed"] += redo
            thread.num_cached += n
            self.block_manager.register(thread)
            child = self._deferred_child(thread, thread.num_cached) if n else None
            if child is not None:  # the parent has just fed the child's [Fork]: fork its KV now
                child.fork_deferred = False
                self.runner.fork(thread.seq_id, *self.scheduler.fork(thread, child))
            if thread.num_cached == len(thread.token_ids) and not thread.finished:
                rows.append(row)
                ready.append(thread)
            row += 1 + thread.draft_rows
        return rows, ready

    @staticmethod
    def _deferred_child(thread: Thread, end: int) -> Thread | None:
        """The child waiting on a deferred fork at `thread`'s token `end - 1`, if that is one."""
        child = thread.children.get(end - 1 - thread.own_start)
        return child if child is not None and child.fork_deferred else None

    def _fork_room(self) -> int | None:
        """Sequence ids left for new forks: deferred children take theirs when they get KV."""
        room = self.seq_ids.room
        if room is None:
            return None
        return room - sum(t.fork_deferred for r in self.scheduler.running for t in r.threads)

    def _choose(self, logits, threads: list[Thread], offers=None) -> list[tuple[int, tuple | None]]:
        """One token per row (and its logprob entry where asked for), with every rule applied
        over each thread's tokens so far; `logits` is changed in place. `offers`: drawn draft
        tokens to settle (`_offer`)."""
        logprobs = model_logprobs(logits, threads)  # the model's own distribution, before any rule
        apply_penalties(logits, threads, self.control)
        apply_apar_rules(logits, threads, self.control, fork_room=self._fork_room())
        for i, thread in enumerate(threads):
            for rule in thread.request.params.logits_rules:
                rule(thread, logits[i])
        return [
            (token, token_logprob(logprobs[i], token, t.request.params.logprobs) if i in logprobs else None)
            for i, (t, token) in enumerate(zip(threads, sample(logits, threads, offers)))
        ]

    @torch.inference_mode()  # the rules change the runner's logits (inference tensors) in place
    def _sample(self, logits, rows: list[int], ready: list[Thread]) -> None:
        """Every ready thread's first token is chosen from its first row, all at once, as before
        any token of the step is applied. A thread with a draft then goes on through its
        draft's rows while each sample equals the draft token (speculation.py)."""
        # Every row a first row (no drafts): the logits as they are, not a copy (98 rows of 49k
        # logits took ~3 ms a step to copy).
        offers = [self._offer(thread, 0) for thread in ready]
        chosen = self._choose(logits if rows == list(range(len(logits))) else logits[rows], ready, offers)
        for thread, row, (token, logprob) in zip(ready, rows, chosen):
            if thread.request.finished:  # ended by a sibling's token this step (an error)
                continue
            draft, accepted = thread.draft, 0
            while accepted < len(draft) and token == draft[accepted] and not self._ends_step(thread, token):
                self._append(thread, token, logprob)
                thread.num_cached += 1  # the draft token's K/V were computed in this forward
                accepted += 1
                token, logprob = self._choose(logits[row + accepted : row + accepted + 1].clone(), [thread],
                                              [self._offer(thread, accepted)])[0]
            sibling, after = self._sibling(thread, accepted, token), True
            if sibling is not None:
                # The model's token is a sibling: its row gives the token after it. Its K/V sit
                # past the verified ones, so it is given back and fed again next step (one row)
                # with the token after it, which is taken here unless it is a control or end
                # token (then it is sampled again after the sibling is fed: greedy, the same).
                self._append(thread, token, logprob)
                self._taken[thread.thread_id] = len(thread.draft_siblings) - sibling
                at = row + 1 + len(draft) + sibling
                token, logprob = self._choose(logits[at:at + 1].clone(), [thread], [None])[0]
                after = token not in self.control.ids and token not in self.control.eos_ids
            if draft or thread.draft_siblings:  # (a sibling counts as accepted where its next token is taken)
                self._settle_draft(thread, accepted, sibling is not None and after)
            if after:
                self._apply_token(thread, token, logprob)

    def _sibling(self, thread: Thread, depth: int, token: int) -> int | None:
        """Which of the thread's fed siblings is `token` at draft position `depth`, if one is
        and the step may go on past it."""
        for k, (j, sibling) in enumerate(thread.draft_siblings):
            if j == depth and sibling == token and not self._ends_step(thread, token):
                return k
        return None

    def _offer(self, thread: Thread, j: int) -> tuple[list[int], torch.Tensor] | None:
        """Draft token j with its siblings, in the order they were drawn, and the distribution
        they were drawn from, where they were drawn (a head's draft for a sampled request): the
        sampler keeps one or draws another by the speculative-sampling rule. None for point-mass
        drafts (lookup's, or a greedy request's head's), kept where the row's own sample equals
        one of them."""
        if j >= len(thread.draft_dists):
            return None
        tokens = [thread.draft[j]] + [token for depth, token in thread.draft_siblings if depth == j]
        return tokens, self.drafter.spread(thread.draft_dists[j], self.runner.info.vocab_size)

    def _ends_step(self, thread: Thread, token: int) -> bool:
        """Tokens after which a thread stops accepting its draft: forks, ends and the budget
        are settled at the end of a step."""
        control, request = self.control, thread.request
        return (
            token in control.ids
            or token in control.eos_ids
            or request.num_generated + 1 >= request.params.max_tokens
            or len(thread.token_ids) + 1 >= self.config.max_model_len
        )

    def _settle_draft(self, thread: Thread, accepted: int, sibling: bool = False) -> None:
        """Counts the draft (a sibling taken counts as accepted at its position), gives back the
        KV of its rejected positions and siblings, registers what was verified."""
        request = thread.request
        drafted, kept = thread.draft_rows, accepted + sibling
        reach = max([len(thread.draft)] + [j + 1 for j, _ in thread.draft_siblings])  # positions drafted at
        request.num_draft_tokens += drafted
        request.num_accepted_tokens += kept
        request.num_sibling_tokens += len(thread.draft_siblings)
        request.num_accepted_sibling_tokens += sibling
        for counts, n in ((request.drafted_at, reach), (request.accepted_at, kept)):
            counts.extend([0] * (n - len(counts)))
            for j in range(n):
                counts[j] += 1
        self._counts["drafted"] += drafted
        self._counts["accepted"] += kept
        if thread.draft_by_head:  # (the head's chances are its own confidence, not these counts)
            self._counts["head_drafted"] += drafted
            self._counts["head_accepted"] += kept
            request.num_head_draft_tokens += drafted
            request.num_head_accepted_tokens += kept
            if self._head_step is not None:
                self._head_step[1] += drafted
                self._head_step[2] += kept
                if thread.draft_dists:  # (drawn siblings: their rate prices the next ones, eagle.py)
                    self._head_step[3] += len(thread.draft_siblings)
                    self._head_step[4] += sibling
        else:
            thread.draft_stats.update(len(thread.draft), accepted)
        thread.draft, thread.draft_dists, thread.draft_siblings = [], [], []
        self.block_manager.truncate(thread, thread.num_cached + 1)  # cached tokens and the one to come
        self.runner.truncate(thread.seq_id, thread.position(thread.num_cached))
        self.block_manager.register(thread)

    def _append(self, thread: Thread, token: int, logprob) -> None:
        thread.token_ids.append(token)
        if thread.logprobs is not None:
            thread.logprobs.append(logprob)
        thread.request.num_generated += 1
        self._counts["tokens"] += 1

    def _apply_token(self, thread: Thread, token: int, logprob=None) -> None:
        request, params, control = thread.request, thread.request.params, self.control
        self._append(thread, token, logprob)
        if token == control.fork_id and params.mode in FORKING_MODES:
            child = request.fork(thread, control.child_id)
            if self.drafter is not None:
                self.drafter.fork(thread.thread_id, child.thread_id, child.own_start - 1)
            request.num_generated += 1
            self._counts["forks"] += 1
            if self._rows_dear:  # the KV comes after the parent feeds the [Fork] (module docstring)
                child.fork_deferred = True
                request.num_deferred_forks += 1
                self._counts["deferred_forks"] += 1
            else:
                self.runner.fork(thread.seq_id, *self.scheduler.fork(thread, child))
        elif token == control.join_id and params.mode in FORKING_MODES:
            if not params.joins:
                request.error = "[Join] was sampled, but this request does not join (SamplingParams.join)"
                self._finish_request(request, FinishReason.ERROR)
                return
            request.join(thread)  # the thread waits: _make_joins puts the join in place
        elif token in control.eos_ids and not params.ignore_eos:
            self._finish_thread(thread, FinishReason.STOP)
        elif len(thread.token_ids) >= self.config.max_model_len:
            self._finish_thread(thread, FinishReason.LENGTH)

    def _finish_thread(self, thread: Thread, reason: FinishReason) -> None:
        thread.finish_reason = reason
        if thread.request.params.joins:
            self.scheduler.release_unneeded(thread.request)  # its KV stays while a join may read it
        else:
            self.scheduler.free(thread)
        self._release_sequences()

    def _finish_request(self, request: Request, reason: FinishReason) -> None:
        for thread in request.live_threads:
            thread.finish_reason = reason
        if self.drafter is not None:
            for thread in request.threads:
                self.drafter.release(thread.thread_id)
        request.finish_reason = request.finish_reason or reason
        request.times.finished = request.times.finished or time.monotonic()
        self.scheduler.remove(request)
        self._release_sequences()

    def _release_sequences(self) -> None:
        for seq_id in self.scheduler.take_released():
            self.runner.release(seq_id)

    def _account(self, request: Request, now: float) -> RequestOutput:
        times = request.times
        if not request.finished:
            request.num_steps += 1
            if times.scheduled is None:
                times.scheduled = self._step_started
            if times.first_token is None and request.num_generated:
                times.first_token = now
            request.peak_blocks = max(request.peak_blocks, len(request.held_blocks))
            if request.num_generated >= request.params.max_tokens:
                self._finish_request(request, FinishReason.LENGTH)
            elif not request.live_threads:
                self._finish_request(request, FinishReason.STOP)
        tokens: list[int] = []
        complete, logprobs = False, None
        if request.params.logprobs is not None and (request.streaming or request.finished):
            tokens, origins, complete = restore_origins(request.root, self.control, final_only=True)
            logprobs = [thread.logprobs[i] for thread, i in origins]
        elif request.streaming or request.finished:
            tokens, complete = linearize(request.root, self.control, final_only=True)
        if request.finished:
            self.requests.pop(request.request_id, None)  # its output carries everything needed
        return RequestOutput(
            request_id=request.request_id,
            text="",
            delta="",
            token_ids=tokens,
            finished=request.finished,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            num_generated_tokens=request.num_generated,
            num_steps=request.num_steps,
            num_threads=len(request.threads),
            peak_kv_blocks=request.peak_blocks,
            num_prompt_tokens=len(request.prompt_token_ids),
            attention_work=request.attention_work,
            num_preemptions=request.num_preemptions,
            num_recomputed_tokens=request.num_recomputed_tokens,
            num_serialized_steps=request.num_serialized_steps,
            num_deferred_forks=request.num_deferred_forks,
            num_draft_tokens=request.num_draft_tokens,
            num_accepted_tokens=request.num_accepted_tokens,
            num_head_draft_tokens=request.num_head_draft_tokens,
            num_head_accepted_tokens=request.num_head_accepted_tokens,
            num_sibling_tokens=request.num_sibling_tokens,
            num_accepted_sibling_tokens=request.num_accepted_sibling_tokens,
            drafted_at=tuple(request.drafted_at),
            accepted_at=tuple(request.accepted_at),
            error=request.error,
            complete=complete,
            logprobs=logprobs,
            shape=request.shape(),
            times=times,
        )
