"""Drafting: what each thread drafts, at what price, and how a verified draft is settled.

The engine calls it at two points of its step: before the forward (`propose`: lookup drafts,
speculation.py, and a trained head's, eagle.py, sized by the step-cost curve and fed as chains
or trees) and after sampling (`observe`: the head reads the target's hidden states of what was
verified). While the engine samples a thread's draft rows it asks `offer` (the drawn tokens a
sampled request's draft must be settled against), `sibling` (whether the model's token is one of
the fed siblings) and `ends_step`, and then `settle` gives back the KV of what was rejected.
The engine's step stays schedule -> run -> sample -> account; everything here changes what a
step feeds, never what a request's text is (the tests compare drafting runs with plain ones).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import speculation
from .runner import SequenceSlice
from .scheduler import ScheduledBatch
from .thread import Thread


class Proposal(NamedTuple):
    """A thread's draft before the step sizes it (`Drafting.propose`)."""

    index: int  # the thread's place in the batch
    thread: Thread
    tokens: list[int]  # the chain
    gains: list[float]  # each token's chance to be accepted, all before it accepted too
    by_head: bool  # a trained head's (else lookup's)
    dists: list  # where the head drew the tokens (sampled requests): their distributions
    siblings: list[tuple[int, int, float]]  # (depth, token, chance): the head's other tokens per position


def speculates(thread: Thread) -> str | None:
    """The thread's drafting method ("ngram", "eagle"; the engine's default is put in at
    `add`), None if it does not draft."""
    method = thread.request.params.speculative
    return None if method in (None, "off") else method


class Drafting:
    def __init__(self, config, control, scheduler, step_cost, counts: dict, vocab_size: int, head=None) -> None:
        """`counts`: the engine's counters (drafted, accepted, head_drafted, head_accepted are
        added to here); `head`: an `eagle.HeadDrafter` for requests that speculate with "eagle".
        It holds no runner: the engine makes every runner call (the forward, giving back KV)."""
        self.config, self.control, self.scheduler, self.step_cost = config, control, scheduler, step_cost
        self.vocab_size = vocab_size
        self.counts = counts
        self.head = head
        # Threads the head drafted for this step, its tokens fed, accepted; its drawn siblings fed, taken.
        self._head_step: list[int] | None = None
        self._hidden = None  # this step's StepHidden where the head reads it, and each thread's first row
        self._taken: dict[int, int] = {}  # thread id -> the row (from its slice's end) of a sibling taken this step

    # ---- before the forward ----------------------------------------------------------
    def propose(self, batch: ScheduledBatch, tree_slices: bool) -> None:
        """Drafts for the threads that sample this step and speculate (speculation.py); a
        trained head's for all its threads at once (eagle.py), with siblings where the runner
        takes `tree_slices`."""
        sampling, proposals, asks = 0, [], []
        rows = fixed = sum(batch.num_tokens)  # fixed: rows that make no token this step (prompt chunks)
        for i, (thread, n) in enumerate(zip(batch.threads, batch.num_tokens)):
            if n != len(thread.pending):
                continue
            sampling, fixed = sampling + 1, fixed - n
            if not speculates(thread) or thread.deferred_child(len(thread.token_ids)) is not None:
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
                proposals.append(Proposal(i, thread, draft, gains, False, [], []))
            elif speculates(thread) == "eagle" and not thread.spans:
                asks.append((i, thread, k))  # (positions moved by a join: the head's cache does not hold them)
        decode_cost = speculation.decode_cost(self.step_cost, rows, fixed)
        if asks and self._head_pays(asks, rows, sampling, decode_cost):
            # A head's token is worth computing where its chance beats its price: its row and its
            # share of the head's passes (one-row steps), against the tokens per cost the step makes.
            min_gain = (self.step_cost.marginal(rows) + self._pass_price(len(asks)) / len(asks)) * sampling / decode_cost
            sibling_gain = self.step_cost.marginal(rows) * sampling / decode_cost  # (a sibling costs no pass: its row)
            # Sampled requests' drafts are drawn from the head's distribution (sampler.settle_offer).
            draws = [None if t.request.params.greedy else (t.request.params.temperature, t.generator) for _, t, _ in asks]
            siblings = [t.request.params.num_draft_siblings if tree_slices else 0 for _, t, _ in asks]
            drafts = self.head.propose([(t.thread_id, t.token_ids, k) for _, t, k in asks], min_gain, draws, siblings,
                                       sibling_gain)
            proposals += [Proposal(i, t, d.tokens, d.gains, True, d.dists, d.siblings)
                          for (i, t, _), d in zip(asks, drafts) if d.tokens]
            proposals.sort(key=lambda p: p.index)
            self._head_step = [len(asks), 0, 0, 0, 0]
        elif asks:
            self.head.rest()
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
        fed, accepted = self.head.expected_yield
        return len(asks) * (accepted * worth - fed * self.step_cost.marginal(rows)) > self._pass_price(len(asks))

    def _pass_price(self, threads: int) -> float:
        """A pass of the head over `threads` threads, in one-row steps."""
        return self.head.pass_cost + self.head.thread_cost * (threads - 1)

    @staticmethod
    def tree(thread: Thread, n: int) -> tuple[int, ...]:
        """The slice's parents where the draft has siblings (runner.SequenceSlice): the fed tokens
        and the draft a chain, a sibling of draft token j after the token before it."""
        if not thread.draft_siblings:
            return ()
        return tuple(range(-1, n + len(thread.draft) - 1)) + tuple(n - 1 + j for j, _ in thread.draft_siblings)

    def hidden_layers(self, batch: ScheduledBatch) -> tuple[int, ...] | None:
        """The target's layers whose hidden states the head reads this step (a thread drafts
        with it), else None: a plain forward."""
        self._hidden = None
        if self.head is None or not any(speculates(t) == "eagle" for t in batch.threads):
            return None
        return self.head.layers

    def keep_hidden(self, aux: torch.Tensor, slices: list[SequenceSlice], batch: ScheduledBatch) -> None:
        """This step's hidden states (`hidden_layers`' forward), for `observe`."""
        first, rows = [], 0
        for t, s in zip(batch.threads, slices):
            first.append((rows, t.num_cached, len(s.token_ids)))
            rows += len(s.token_ids)
        self._hidden = (aux, first)

    # ---- while sampling --------------------------------------------------------------
    def ends_step(self, thread: Thread, token: int) -> bool:
        """Tokens after which a thread stops accepting its draft: forks, ends and the budget
        are settled at the end of a step."""
        control, request = self.control, thread.request
        return (
            token in control.ids
            or token in control.eos_ids
            or request.num_generated + 1 >= request.params.max_tokens
            or len(thread.token_ids) + 1 >= self.config.max_model_len
        )

    def sibling(self, thread: Thread, depth: int, token: int) -> int | None:
        """Which of the thread's fed siblings is `token` at draft position `depth`, if one is
        and the step may go on past it."""
        for k, (j, sibling) in enumerate(thread.draft_siblings):
            if j == depth and sibling == token and not self.ends_step(thread, token):
                return k
        return None

    def take_sibling(self, thread: Thread, k: int) -> None:
        """The thread's sibling k was taken: the head reads its row's features after the step."""
        self._taken[thread.thread_id] = len(thread.draft_siblings) - k

    def offer(self, thread: Thread, j: int) -> tuple[list[int], torch.Tensor] | None:
        """Draft token j with its siblings, in the order they were drawn, and the distribution
        they were drawn from, where they were drawn (a head's draft for a sampled request): the
        sampler keeps one or draws another by the speculative-sampling rule. None for point-mass
        drafts (lookup's, or a greedy request's head's), kept where the row's own sample equals
        one of them."""
        if j >= len(thread.draft_dists):
            return None
        tokens = [thread.draft[j]] + [token for depth, token in thread.draft_siblings if depth == j]
        return tokens, self.head.spread(thread.draft_dists[j], self.vocab_size)

    def settle(self, thread: Thread, accepted: int, sibling: bool = False) -> None:
        """Counts the draft (a sibling taken counts as accepted at its position) and clears it;
        the engine then gives back the KV of its rejected positions and siblings."""
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
        self.counts["drafted"] += drafted
        self.counts["accepted"] += kept
        if thread.draft_by_head:  # (the head's chances are its own confidence, not these counts)
            self.counts["head_drafted"] += drafted
            self.counts["head_accepted"] += kept
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

    # ---- after sampling --------------------------------------------------------------
    def observe(self, batch: ScheduledBatch) -> None:
        """Hands the head the target's hidden states of every verified position fed this step,
        and what its drafts yielded."""
        if self._hidden is not None:
            aux, first = self._hidden
            self._hidden = None
            taken, self._taken = self._taken, {}
            for thread, (row, start, fed) in zip(batch.threads, first):
                verified = thread.num_cached - start  # (< 0 where the thread ended this step and gave back its KV)
                if speculates(thread) == "eagle" and not thread.request.finished and verified > 0:
                    self.head.observe(thread.thread_id, start, thread.token_ids[start:start + verified],
                                      aux[row:row + verified])
                    if thread.thread_id in taken:  # a sibling taken: its row's features, its position is next
                        at = row + fed - taken[thread.thread_id]
                        self.head.observe(thread.thread_id, thread.num_cached,
                                          thread.token_ids[thread.num_cached:thread.num_cached + 1], aux[at:at + 1])
        if self._head_step is not None:
            self.head.record(*self._head_step)
            self._head_step = None

    # ---- threads ---------------------------------------------------------------------
    def fork(self, parent: Thread, child: Thread) -> None:
        if self.head is not None:
            self.head.fork(parent.thread_id, child.thread_id, child.own_start - 1)

    def release(self, threads: list[Thread]) -> None:
        if self.head is not None:
            for thread in threads:
                self.head.release(thread.thread_id)
