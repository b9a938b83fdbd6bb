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
from dataclasses import replace

import torch

from ..config import EngineConfig, cache_dir
from ..restore import linearize, restore_origins
from ..sampling import FORKING_MODES, SamplingParams
from ..tokens import ControlTokens
from . import step_cost
from .drafting import Drafting
from .block_manager import BlockManager
from .runner import JoinSource, KVSpan, Runner, SequenceSlice
from .sampler import apply_apar_rules, apply_penalties, model_logprobs, sample, token_logprob
from .scheduler import ScheduledBatch, Scheduler
from .outputs import EngineStats, RequestOutput, request_output  # noqa: F401 (RequestOutput: still importable from here)
from .thread import FinishReason, Join, Request, Thread


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
        cost = self._step_cost()
        if drafter is not None and cost.source == "measured":
            # The head's pass priced as timed here, in one-row steps (its weight bytes alone, the
            # facade's estimate, left out its threads' share: 64 threads cost 19 ms, not 5).
            base, per_thread = drafter.time_pass()
            drafter.pass_cost, drafter.thread_cost = base / cost.ms[0], per_thread / cost.ms[0]
        self.defer_forks_from_rows = config.defer_forks_from_rows
        self._rows_dear = False  # this step's rows reach defer_forks_from_rows
        # What each thread drafts, its price and its settling (drafting.py); the head: eagle.py.
        self.drafting = Drafting(config, control, self.scheduler, cost, self._counts, info.vocab_size, drafter)

    @property
    def step_cost(self) -> step_cost.StepCost:
        """The decode step's cost against its rows (step_cost.py), which sizes drafts."""
        return self.drafting.step_cost

    @step_cost.setter
    def step_cost(self, curve: step_cost.StepCost) -> None:
        self.drafting.step_cost = curve

    @property
    def drafter(self):
        """The trained draft head (`eagle.HeadDrafter`), None without one."""
        return self.drafting.head

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
            self.drafting.propose(batch, self.runner.info.tree_slices)
            fed = sum(batch.num_tokens) + sum(t.draft_rows for t in batch.threads)  # the forward's query rows
            limit = self.defer_forks_from_rows
            self._rows_dear = limit is not None and fed >= limit
            logits = self._run(batch)
            rows, ready = self._advance(batch)
            if ready:
                self._sample(logits, rows, ready)
            self.drafting.observe(batch)
            for thread in batch.threads:
                touched[thread.request.request_id] = thread.request
        now = time.monotonic()
        return [self._account(request, now) for request in touched.values()]

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
                          tuple(span for _, span in t.spans), self.drafting.tree(t, n))
            for t, n in zip(batch.threads, batch.num_tokens)
        ]
        self.total_steps += 1
        layers = self.drafting.hidden_layers(batch)
        if layers is None:
            return self.runner.forward(slices)
        out = self.runner.forward_hidden(slices, layers)
        self.drafting.keep_hidden(out.aux, slices, batch)
        return out.logits

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
            child = thread.deferred_child(thread.num_cached) if n else None
            if child is not None:  # the parent has just fed the child's [Fork]: fork its KV now
                child.fork_deferred = False
                self.runner.fork(thread.seq_id, *self.scheduler.fork(thread, child))
            if thread.num_cached == len(thread.token_ids) and not thread.finished:
                rows.append(row)
                ready.append(thread)
            row += 1 + thread.draft_rows
        return rows, ready

    def _fork_room(self) -> int | None:
        """Sequence ids left for new forks: deferred children take theirs when they get KV."""
        room = self.seq_ids.room
        if room is None:
            return None
        return room - sum(t.fork_deferred for r in self.scheduler.running for t in r.threads)

    def _choose(self, logits, threads: list[Thread], offers=None) -> list[tuple[int, tuple | None]]:
        """One token per row (and its logprob entry where asked for), with every rule applied
        over each thread's tokens so far; `logits` is changed in place. `offers`: drawn draft
        tokens to settle (`Drafting.offer`)."""
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
        drafting = self.drafting
        offers = [drafting.offer(thread, 0) for thread in ready]
        chosen = self._choose(logits if rows == list(range(len(logits))) else logits[rows], ready, offers)
        for thread, row, (token, logprob) in zip(ready, rows, chosen):
            if thread.request.finished:  # ended by a sibling's token this step (an error)
                continue
            draft, accepted = thread.draft, 0
            while accepted < len(draft) and token == draft[accepted] and not drafting.ends_step(thread, token):
                self._append(thread, token, logprob)
                thread.num_cached += 1  # the draft token's K/V were computed in this forward
                accepted += 1
                token, logprob = self._choose(logits[row + accepted : row + accepted + 1].clone(), [thread],
                                              [drafting.offer(thread, accepted)])[0]
            sibling, after = drafting.sibling(thread, accepted, token), True
            if sibling is not None:
                # The model's token is a sibling: its row gives the token after it. Its K/V sit
                # past the verified ones, so it is given back and fed again next step (one row)
                # with the token after it, which is taken here unless it is a control or end
                # token (then it is sampled again after the sibling is fed: greedy, the same).
                self._append(thread, token, logprob)
                drafting.take_sibling(thread, sibling)
                at = row + 1 + len(draft) + sibling
                token, logprob = self._choose(logits[at:at + 1].clone(), [thread], [None])[0]
                after = token not in self.control.ids and token not in self.control.eos_ids
            if draft or thread.draft_siblings:  # (a sibling counts as accepted where its next token is taken)
                drafting.settle(thread, accepted, sibling is not None and after)
                self.block_manager.truncate(thread, thread.num_cached + 1)  # cached tokens and the one to come
                self.runner.truncate(thread.seq_id, thread.position(thread.num_cached))
                self.block_manager.register(thread)
            if after:
                self._apply_token(thread, token, logprob)

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
            self.drafting.fork(thread, child)
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
        self.drafting.release(request.threads)
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
        return request_output(request, tokens, complete, logprobs)
