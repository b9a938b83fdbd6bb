"""Drafts from a trained EAGLE-3 head (draft/head.py), per thread, verified like n-gram drafts.

Each thread that speculates with `"eagle"` keeps the head's own key/value cache over its
context: position t holds the head's step-0 keys from the target's hidden states at t (the
residual stream entering three layers, returned for every fed row by the runner's
`forward_hidden`) and the embedding of the token after t. A position enters the cache once its
next token is known, lazily, when the thread next drafts. The draft is then a chain: the head's
output at the thread's last cached position predicts the token after the pending one; each
further token comes from one more step of the head over its own previous output, at the next
position, seeing the cache and the chain's earlier keys (as trained). For a greedy request
each token is the head's most likely, a point mass, verified exactly as an n-gram draft
(speculation.py): the output is the same token for token. For a sampled request each token is
drawn from the head's distribution at the request's temperature, and the engine keeps or
replaces it by the speculative-sampling rule against that distribution (sampler.settle_offer):
every token is distributed as without drafts, and a drawn draft is kept more often than the
head's most likely token would be (on held-out answers at temperature 1.0, the first draft
token 0.40 of the time against 0.30).

**Trees.** On a runner that takes tree slices (`SamplingParams.num_draft_siblings`) the head also
offers, at every chain position, siblings: for a greedy request its next most likely tokens there,
each with the chance the chain reaches that position times the head's probability of it; for a
sampled one tokens drawn after the chain's from the same distribution without replacement, which
the sampler settles with it by the recursive speculative-sampling rule (sampler.settle_offer), each
with the chance the chain reaches its position times the rate at which drawn siblings have been
taken (`sibling_rate`), never anything read off the draw. They cost no pass (the head's
distribution there is computed for the chain anyway), only their rows, and the engine feeds those
that pay beside the chain as one tree slice (engine.py); where the model's token at a position is
a sibling, it and the token its row gives are taken. Siblings are never extended: a deeper tree
would need a pass per branch.

**Forks.** A child's context is its parent's up to the `[Fork]`: at its first draft the child
copies the parent's cache below the `[Fork]`'s position (those positions' next tokens are the
same for both) and adds the `[Fork]`'s own position from the hidden states of whoever fed it
(the child itself, or the parent when the fork was deferred: the parent keeps those rows until
its children took them). A thread whose cache cannot be completed (a position's hidden states
were never seen: after a preemption whose recompute found blocks in the prefix cache) drafts
nothing; that is counted as `gaps`, and the output is unchanged (only fewer drafts). For the
same reason a request that drafts with a head never takes blocks from the prefix cache
(scheduler.py): its prompt is computed, not reused. Threads whose positions a join moved do not
draft.

**Cost.** The head is one decoder layer and an LM head over the draft vocabulary: 7% of the
target's weight bytes (8,192 tokens), but a pass costs more than its bytes, so every asking
thread goes through one pass per chain step together, one call per op for all of them (the
pool, below), the engine prices a pass as timed at start-up (`time_pass`) and runs the head
only where its yield pays for it (engine.py), and chains stop before tokens below the step's
price. Timed on the Zen 4 (AMD EPYC family 25 model 17, 2 threads, bf16, shipped head, caches
evicted as a target step evicts them): a pass for one thread 1.2 ms, +0.1 ms a further thread,
a chain of 4 for one thread 2.6 ms, for 16 threads 7.0 ms, where torch ops per thread took
2.0 / 0.2 / 4.2 ms; its weights read cold ~0.7 ms of it. On 18 Vicuna questions (512 tokens,
greedy, run back to back) that took AR + head from 1.24x to 1.36x AR's tokens/s and APAR + head
from 1.13x to 1.26x APAR's (results/eagle/README.md). Each position of context costs its row
of the layer's q/k/v once; only the last row of an extension goes through the rest. The head's
own running confidence (the product of its top probabilities; calibrated on held-out answers,
draft/train.py) is each token's chance for `speculation.draft_lengths`, which cuts chains as it
cuts n-gram drafts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..draft.head import EagleHead
from .sampler import draw


YIELD_DECAY = 0.8  # weight of the head's past steps against the newest (as a thread's n-gram counts)
# Drawn siblings (sampled requests): how often one is the position's token, counted over the steps
# they were fed in, each step's counts weighted SIBLING_DECAY against the next, from a prior of
# SIBLING_PRIOR (taken, fed). Their chance is the chain's reach times this rate: a rate read from
# past steps never depends on this step's draws. (Priced at the head's top x (1 - top) instead, on
# Vicuna 80 at temperature 1.0 they were half the rows fed and 8% of them were taken: APAR 0.95x.)
SIBLING_DECAY = 0.98
SIBLING_PRIOR = (1.0, 10.0)


class _Linear:
    """x @ W^T in fp32 out: through the row kernel from packed bf16 weights (a few rows at the cost
    of reading the weights once, as the target's linears) where it is given, else fp32 torch."""

    def __init__(self, weight: torch.Tensor, kernel) -> None:
        self.kernel, self.out_features = kernel, weight.shape[0]
        w = weight.detach()
        self.weight = kernel.pack(w.to(torch.bfloat16).contiguous()) if kernel is not None else w.float()

    def __call__(self, x: torch.Tensor, fp32_out: bool = True) -> torch.Tensor:
        if self.kernel is None:
            return x.float() @ self.weight.T
        return self.kernel.mm(x.to(torch.bfloat16).contiguous(), self.weight, self.out_features, fp32_out)


class HeadDraft(NamedTuple):
    """What `propose` gives one thread: the chain, each token's chance (the head's running
    confidence), the distributions its tokens were drawn from (sampled requests), and the
    siblings asked for: (depth j, token, chance), another likely token at chain position j."""

    tokens: list[int]
    gains: list[float]
    dists: list[torch.Tensor]
    siblings: list[tuple[int, int, float]]


@dataclass
class _State:
    slots: torch.Tensor  # [capacity] the pool slot of each position; the first `held` are this thread's
    held: int = 0
    n: int = 0  # positions 0..n-1 cached
    aux: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> target features, not cached yet
    fork_aux: dict[int, torch.Tensor] = field(default_factory=dict)  # [Fork] position -> features, for children
    out: tuple[torch.Tensor, torch.Tensor] | None = None  # (pre-norm, normed) output at position n - 1
    parent: _State | None = None
    fork_pos: int = -1  # the [Fork]'s position in the parent (children only, until copied)


class HeadDrafter:
    """The per-thread caches of one head; the engine calls `observe` after each forward,
    `propose` when a thread may draft, `fork` and `release` as threads are born and end.

    Every thread's keys and values live in one pool, [slots, 2, kv heads, head dim] (bf16 with
    the row kernel, else fp32), a thread holding one slot per position it cached or drafted at;
    `release` gives them back (`free` holds every slot no thread holds). So a pass over several
    threads is one call per op for all of them: with the row kernel, the target's own fused
    calls (norms, rotary and cache write, attention over each row's slots, silu), 12 calls a
    pass where per-thread torch ops took ~60 and a loop per thread for attention."""

    def __init__(self, head: EagleHead, embed, fork_id: int, stop_ids: set[int], child_id: int, kernel=None) -> None:
        """`embed`: token ids -> the target's input embeddings; `kernel`: parafork's row kernel
        (runners/row_kernel.py) to run the head in bf16 from packed weights, as the target;
        None: fp32 torch."""
        self.head = head.eval()
        self.embed = embed
        c = head.config
        if c.head_dim % 16 or c.head_dim > 256 or c.hidden_size % 2:
            kernel = None  # (the kernel's attention takes head dims of 16k up to 256; linears, even widths)
        self.kernel = kernel
        self.fork_id, self.stop_ids, self.child_id = fork_id, stop_ids, child_id
        self.group = c.num_attention_heads // c.num_key_value_heads
        # Added to the head's logits where it draws its tokens: [Child] is never drafted.
        self._no_child = torch.where(head.draft_to_target == child_id, float("-inf"), 0.0)
        self.states: dict[int, _State] = {}
        self.gaps = 0
        self.layers = c.aux_layers
        a, m = head.midlayer.self_attn, head.midlayer.mlp
        # q, k, v as one linear (the softmax scale folded into q's rows) and gate, up as one.
        qkv = torch.cat([a.q_proj.weight / math.sqrt(c.head_dim), a.k_proj.weight, a.v_proj.weight])
        self.linears = {name: _Linear(weight, kernel) for name, weight in (
            ("fc", head.fc.weight), ("qkv", qkv), ("o", a.o_proj.weight),
            ("gate_up", torch.cat([m.gate_proj.weight, m.up_proj.weight])), ("down", m.down_proj.weight),
            ("lm", head.lm_head.weight))}
        self.dtype = torch.bfloat16 if kernel is not None else torch.float32
        self.norms = {name: norm.weight.detach().to(self.dtype) for name, norm in (
            ("embed", head.midlayer.input_layernorm), ("feature", head.midlayer.hidden_norm),
            ("post", head.midlayer.post_attention_layernorm), ("final", head.norm))}
        self.eps = c.rms_norm_eps
        # Bytes of weights one pass reads; `pass_cost`, a pass's price in one-row steps of the
        # target, is set by whoever knows the target's (llm.py: these bytes against its weights').
        self.weight_bytes = sum(w.numel() for w in (head.fc.weight, qkv, a.o_proj.weight, m.gate_proj.weight,
                                                    m.up_proj.weight, m.down_proj.weight, head.lm_head.weight)
                                ) * (2 if kernel is not None else 4)
        self.pass_cost = 0.0
        self.thread_cost = 0.0  # and each thread's share beyond it (its attention, its bookkeeping)
        # What a pass has been yielding: per thread asked, head tokens fed and accepted, decayed
        # counts (prior 1 and 1/2; a step the head sits out decays them back toward it, so it
        # tries again).
        self._asked, self._drafted, self._accepted = 0.0, 0.0, 0.0
        self._siblings_taken, self._siblings_fed = 0.0, 0.0  # drawn siblings' record (`sibling_rate`)
        self.pool = torch.empty(0, 2, c.num_key_value_heads, c.head_dim, dtype=self.dtype)
        self.free: list[int] = []
        self._cos = self._sin = torch.empty(0, c.head_dim, dtype=self.dtype)
        self._no_delta = torch.empty(0, dtype=torch.bfloat16)
        self._no_prefix = (torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                           torch.empty(0, dtype=torch.long))

    def time_pass(self, threads: int = 16, context: int = 256, rounds: int = 3) -> tuple[float, float]:
        """ms of one pass for one thread and for each further one, timed on made-up threads of
        `context` positions, caches evicted before each pass as a target step evicts them (best
        of `rounds`): see the module's docstring for what it reads on the Zen 4."""
        c = self.head.config
        evict = torch.empty(32 << 20)
        best = {}
        for n in (1, threads):
            ids = [-(k + 1) for k in range(n)]  # never a real thread's id
            asks = []
            width = len(c.aux_layers) * c.hidden_size
            for t in ids:  # (tokens and states as varied as real ones: embedding rows gathered from afar)
                tokens = torch.randint(0, c.vocab_size, (context + 1,), generator=torch.Generator().manual_seed(t)).tolist()
                self.observe(t, 0, tokens[:-1], torch.randn(context, width))
                asks.append((t, tokens, 1))
            self.propose(asks)
            times = []
            for _ in range(rounds):
                for t, tokens, _ in asks:
                    tokens.append(tokens[-context // 2])
                    self.observe(t, len(tokens) - 2, tokens[-2:-1], torch.randn(1, width))
                evict.fill_(1.0)
                start = time.perf_counter()
                self.propose(asks)
                times.append(time.perf_counter() - start)
            for t in ids:
                self.release(t)
            best[n] = 1000 * min(times)
        return best[1], max(0.0, (best[threads] - best[1]) / (threads - 1))

    @property
    def expected_yield(self) -> tuple[float, float]:
        """Per thread a pass drafts for: the head's tokens it is expected to feed, and to have accepted."""
        return (self._drafted + 1.0) / (self._asked + 1.0), (self._accepted + 0.5) / (self._asked + 1.0)

    def record(self, asked: int, drafted: int, accepted: int, siblings_fed: int = 0, siblings_taken: int = 0) -> None:
        """A step's outcome: `asked` threads went through the head, `drafted` of its tokens were
        fed, `accepted` of them held; of its drawn siblings, `siblings_fed` were fed and
        `siblings_taken` were their position's token."""
        d = YIELD_DECAY
        self._asked, self._drafted, self._accepted = self._asked * d + asked, self._drafted * d + drafted, self._accepted * d + accepted
        if siblings_fed:
            self._siblings_taken = self._siblings_taken * SIBLING_DECAY + siblings_taken
            self._siblings_fed = self._siblings_fed * SIBLING_DECAY + siblings_fed

    @property
    def sibling_rate(self) -> float:
        """How often a drawn sibling has been its position's token (SIBLING_DECAY, SIBLING_PRIOR)."""
        taken, fed = SIBLING_PRIOR
        return (self._siblings_taken + taken) / (self._siblings_fed + fed)

    def rest(self) -> None:
        """A step without the head."""
        self._asked, self._drafted, self._accepted = (x * YIELD_DECAY for x in (self._asked, self._drafted, self._accepted))

    def _state(self, thread_id: int) -> _State:
        state = self.states.get(thread_id)
        if state is None:
            state = self.states[thread_id] = _State(torch.empty(64, dtype=torch.long))
        return state

    def observe(self, thread_id: int, start: int, tokens: list[int], aux: torch.Tensor) -> None:
        """The target's features of positions start.. (verified tokens only)."""
        if len(tokens) != len(aux):
            raise ValueError(f"thread {thread_id}: {len(aux)} rows of features for {len(tokens)} tokens")
        state = self._state(thread_id)
        for k in range(len(aux)):
            pos = start + k
            if pos >= state.n:
                state.aux[pos] = aux[k]
            if tokens[k] == self.fork_id:
                state.fork_aux[pos] = aux[k]

    def fork(self, parent_id: int, child_id: int, fork_pos: int) -> None:
        child = self._state(child_id)
        child.parent, child.fork_pos = self._state(parent_id), fork_pos

    def release(self, thread_id: int) -> None:
        state = self.states.pop(thread_id, None)
        if state is not None:
            self.free += state.slots[:state.held].tolist()

    def _hold(self, state: _State, n: int) -> None:
        """Slots for the state's positions 0..n-1 (the pool doubles when it runs out)."""
        if state.held >= n:
            return
        need = n - state.held
        if len(self.free) < need:
            old = len(self.pool)
            size = max(old + need, 2 * old, 1024)
            pool = self.pool.new_empty(size, *self.pool.shape[1:])
            pool[:old] = self.pool
            self.pool = pool
            self.free += range(size - 1, old - 1, -1)
        if len(state.slots) < n:
            slots = state.slots.new_empty(max(n, 2 * len(state.slots)))
            slots[:state.held] = state.slots[:state.held]
            state.slots = slots
        state.slots[state.held:n] = torch.tensor(self.free[-need:])
        del self.free[-need:]
        state.held = n

    @torch.inference_mode()
    def propose(self, asks: list[tuple[int, list[int], int]], min_gain: float = 0.0,
                sampling: list[tuple[float, torch.Generator | None] | None] | None = None,
                siblings: list[int] | None = None, sibling_gain: float = 0.0) -> list[HeadDraft]:
        """Drafts for several threads at once: per ask (thread id, the thread's context with its
        last token pending, at most k tokens), the draft, the head's running confidence for
        each token, and the distributions its tokens were drawn from; nothing where the cache
        has a gap.

        `siblings`: per ask, at every chain position j also that many more tokens there: for a
        greedy ask the head's next most likely ones (no control or end token), each with its
        chance, the chain's confidence before j times the head's probability of it; for a sampled
        one tokens drawn after the chain's from the same distribution without replacement
        (`_drawn_siblings`); those below `sibling_gain` left out. The engine feeds the ones that
        pay beside the chain as a tree (engine.py); they cost no pass of the head (its
        distribution at j is computed for the chain anyway), so their price is their row alone,
        and they are never extended.

        `sampling`: per ask, None (greedy requests: each token is the head's most likely, a point
        mass, no distribution returned) or the request's (temperature, generator): each token is
        drawn from the head's distribution at that temperature over the draft vocabulary
        (`[Child]` left out), returned over the draft vocabulary (`spread`) for the engine's
        speculative-sampling rule (sampler.settle_offer). A token's confidence is the head's top
        probability at its position either way, chained; it never depends on the token drawn, so
        where a chain is cut does not bias what is offered.

        The threads go through the head together, one pass per chain step, each op over all
        their rows at once (weights read once for all; drafting thread by thread cost APAR
        0.83x its tokens/s). A chain stops before a token whose confidence is below
        `min_gain` (the engine's price of a drafted token: its row and its share of the head's
        passes), so the head does not compute tokens the step could not pay for."""
        results = [HeadDraft([], [], [], []) for _ in asks]
        sampling = sampling or [None] * len(asks)
        siblings = siblings or [0] * len(asks)
        ready = []
        for i, (thread_id, token_ids, k) in enumerate(asks):
            state, last = self._state(thread_id), len(token_ids) - 2  # the last position whose next token is known
            if k > 0 and last >= 0 and self._adopt(state, token_ids) and self._complete(state, last):
                ready.append((i, state, token_ids, last, k))
        self._extend([(state, token_ids, last) for _, state, token_ids, last, _ in ready if state.n <= last])
        chains = [(i, state, last, k, *state.out, 1.0) for i, state, _, last, k in ready]
        j = 0
        while chains:
            logits = self.linears["lm"](torch.stack([normed for *_, normed, _ in chains]))
            index, prob = self._top(logits)
            tokens = self.head.draft_to_target[index].tolist()
            going = []
            for r, ((i, state, last, k, feature, _, p), token, top) in enumerate(zip(chains, tokens, prob)):
                reach = p  # the chance the chain gets to this position
                if siblings[i] and sampling[i] is None:
                    results[i].siblings.extend(self._siblings(logits[r], top, siblings[i], j, reach, sibling_gain))
                q = None
                if sampling[i] is not None:  # (its top probability at the request's temperature)
                    temperature, generator = sampling[i]
                    q = torch.softmax(logits[r] / temperature + self._no_child, -1)
                    top = float(q.max())
                p *= top  # the head's top probability, chained
                if p < min_gain:
                    continue
                if q is not None:
                    drawn = draw(q, 1.0, float(torch.rand(1, generator=generator)))
                    token = int(self.head.draft_to_target[drawn])
                    if siblings[i]:
                        results[i].siblings.extend(self._drawn_siblings(q, drawn, siblings[i], j, reach, generator,
                                                                        sibling_gain))
                if token == self.child_id:
                    continue
                results[i].tokens.append(token)
                results[i].gains.append(p)
                if q is not None:
                    results[i].dists.append(q)
                if token != self.fork_id and token not in self.stop_ids and j < k - 1:
                    going.append((i, state, last, k, feature, token, p))
            if not going:
                break
            # The chain's keys go after the cache's, at slots the thread holds but has not counted.
            for g in going:
                self._hold(g[1], g[1].n + j + 1)
            pre, normed = self._pass(torch.stack([g[4] for g in going]), [g[5] for g in going],
                                     [(g[1], g[1].n + j, 1) for g in going])
            chains = [(i, state, last, k, pre[r], normed[r], p) for r, (i, state, last, k, _, _, p) in enumerate(going)]
            j += 1
        return results

    def _siblings(self, logits: torch.Tensor, top: float, n: int, depth: int, reach: float, min_gain: float
                  ) -> list[tuple[int, int, float]]:
        """The `n` tokens after the most likely one in a row of the draft vocabulary's logits
        (whose probability is `top`), as (depth, token, chance `reach` x their probability), but
        control and end tokens and those whose chance is below `min_gain`."""
        best, index = logits.topk(n + 1)
        probs = (top * torch.exp(best[1:] - best[0])).tolist()  # (no softmax over the row: top's is known)
        out = []
        for token, prob in zip(self.head.draft_to_target[index[1:]].tolist(), probs):
            if reach * prob >= min_gain and token not in self.stop_ids and token not in (self.fork_id, self.child_id):
                out.append((depth, token, reach * prob))
        return out

    def _drawn_siblings(self, q: torch.Tensor, drawn: int, n: int, depth: int, reach: float,
                        generator: torch.Generator | None, min_gain: float) -> list[tuple[int, int, float]]:
        """A sampled ask's siblings at one position: `n` more tokens drawn from q (the draft
        vocabulary's distribution the chain's token, index `drawn`, came from) one after another
        without replacement, as the speculative-sampling rule settles them (sampler.settle_offer),
        every one kept in draw order (a control token too: it may still be the position's token).
        Their chance, `reach` x `sibling_rate`, never depends on what was drawn, so which of them
        are fed does not bias the draws. None where that is below `min_gain`."""
        chance = reach * self.sibling_rate
        if chance < min_gain:
            return []
        rest, out = q.clone(), []
        rest[drawn] = 0
        for _ in range(n):
            if not rest.sum() > 0:
                break
            index = draw(rest / rest.sum(), 1.0, float(torch.rand(1, generator=generator)))
            rest[index] = 0
            out.append((depth, int(self.head.draft_to_target[index]), chance))
        return out

    def spread(self, q: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """A distribution over the draft vocabulary (from `propose`) over the target's."""
        return torch.zeros(vocab_size).index_put_((self.head.draft_to_target,), q)

    def _top(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Per row of the draft vocabulary's logits: the top token's index and probability."""
        if self.kernel is not None:
            index, prob = self.kernel.top_prob(logits)
            return index, prob.tolist()
        best, index = logits.max(-1)
        return index, torch.exp(best - torch.logsumexp(logits, -1)).tolist()

    def _pass(self, feature: torch.Tensor, next_tokens: list[int], groups: list[tuple[_State, int, int]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the head's layer over rows (feature [R, hidden], the next token's id) in
        groups (state, first position, rows) at consecutive positions of one thread: every row
        writes its keys and values at its position's slot; the last row of each group attends to
        its thread's positions up to its own. Returns, per group, the layer's output at its last
        row before and after the final norm.

        Only the last row goes on past the cache write: a position's keys and values come from
        its inputs alone (the head is one layer), and nothing reads an output but the last one,
        where the chain starts (a prompt's 300 rows cost its cache write, not 300 rows of MLP)."""
        positions = torch.cat([torch.arange(p0, p0 + r) for _, p0, r in groups])
        write = torch.cat([state.slots[p0:p0 + r] for state, p0, r in groups])
        last = torch.tensor([r for _, _, r in groups]).cumsum(0) - 1
        cos, sin = self._rope(int(positions.max()) + 1)
        cos, sin = cos[positions], sin[positions]
        embed = self.embed(torch.tensor(next_tokens)).to(self.dtype)
        feature = feature.to(self.dtype).contiguous()
        c, lin, w = self.head.config, self.linears, self.norms
        h, norm = c.num_attention_heads, torch.nn.functional.rms_norm
        if self.kernel is not None:
            k = self.kernel
            x = torch.cat([k.add_rms_norm(embed.contiguous(), self._no_delta, w["embed"], self.eps),
                           k.add_rms_norm(feature, self._no_delta, w["feature"], self.eps)], -1)
            q = k.rope_cache(lin["qkv"](x, False), cos, sin, self.pool, write, h)
            slots = torch.zeros(len(groups), max(p0 + r for _, p0, r in groups), dtype=torch.long)
            for g, (state, p0, r) in enumerate(groups):
                slots[g, :p0 + r] = state.slots[:p0 + r]
            lens = torch.tensor([p0 + r for _, p0, r in groups])
            att = k.decode_attention(q[last].contiguous(), self.pool, slots, lens, *self._no_prefix)
            hidden = feature[last].contiguous()
            normed = k.add_rms_norm(hidden, lin["o"](att, False), w["post"], self.eps)
            normed = k.add_rms_norm(hidden, lin["down"](k.silu_mul(lin["gate_up"](normed, False)), False),
                                    w["final"], self.eps)
            return hidden, normed
        x = torch.cat([norm(embed, embed.shape[-1:], w["embed"], self.eps),
                       norm(feature, feature.shape[-1:], w["feature"], self.eps)], -1)
        d, kvh = c.head_dim, c.num_key_value_heads
        qkv = lin["qkv"](x).view(len(x), h + 2 * kvh, d)
        qk = qkv[:, :h + kvh] * cos[:, None] + qkv[:, :h + kvh].roll(d // 2, -1) * sin[:, None]
        self.pool[write] = torch.stack([qk[:, h:], qkv[:, h + kvh:]], 1)
        att = []
        for (state, p0, r), row in zip(groups, last.tolist()):
            keys = self.pool[state.slots[:p0 + r]]  # [L, 2, KVH, D]
            att.append(self._attend(qk[row:row + 1, :h], keys[:, 0], keys[:, 1]))
        hidden = feature[last] + lin["o"](torch.cat(att))
        gate, up = lin["gate_up"](norm(hidden, hidden.shape[-1:], w["post"], self.eps)).chunk(2, -1)
        hidden = hidden + lin["down"](torch.nn.functional.silu(gate) * up)
        return hidden, norm(hidden, hidden.shape[-1:], w["final"], self.eps)

    def _rope(self, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [positions, D] up to `top` at least, sin's first half negated
        (rot(x) = x cos + roll(x, D/2) sin, as the target's runner), grown as positions grow."""
        if self._cos.shape[0] < top:
            n = max(top, 2 * self._cos.shape[0], 1024)
            d = self.head.config.head_dim
            angles = torch.arange(n, dtype=torch.float32)[:, None] * (
                1.0 / (self.head.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)))
            angles = torch.cat([angles] * 2, -1)
            sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
            self._cos, self._sin = angles.cos().to(self.dtype), (angles.sin() * sign).to(self.dtype)
        return self._cos, self._sin

    def _attend(self, q, keys, values) -> torch.Tensor:
        """q [R, H, D] against keys/values [L, KVH, D], every key seen (the softmax scale is in q).
        Query head h reads KV head h // G: the G query heads of a KV head go as G x R rows against
        its keys, which are not copied G times."""
        c, g = self.head.config, self.group
        r, kvh = q.shape[0], c.num_key_value_heads
        q = q.reshape(r, kvh, g, c.head_dim).permute(1, 2, 0, 3).reshape(kvh, g * r, c.head_dim)
        scores = q @ keys.permute(1, 2, 0)  # [KVH, G*R, L]
        out = torch.softmax(scores, -1) @ values.transpose(0, 1)  # [KVH, G*R, D]
        return out.view(kvh, g, r, c.head_dim).permute(2, 0, 1, 3).reshape(r, -1)

    def _adopt(self, state: _State, token_ids: list[int]) -> bool:
        """A child's first draft: its cache becomes its parent's below the `[Fork]` (those
        positions' next tokens are the same for both). False where the parent's cannot be had."""
        if state.parent is None:
            return True
        parent, fork_pos = state.parent, state.fork_pos
        state.parent = None
        if not self._adopt(parent, token_ids) or not self._complete(parent, fork_pos - 1):
            self.gaps += 1
            return False
        if parent.n < fork_pos:
            self._extend([(parent, token_ids[:fork_pos + 1], fork_pos - 1)])
        self._hold(state, fork_pos)
        self.pool[state.slots[:fork_pos]] = self.pool[parent.slots[:fork_pos]]
        state.n = fork_pos
        if fork_pos not in state.aux and fork_pos in parent.fork_aux:
            state.aux[fork_pos] = parent.fork_aux[fork_pos]
        return True

    def _complete(self, state: _State, last: int) -> bool:
        """Whether the cache can reach `last`: every position up to it cached or its features
        seen (a missing one is a gap, counted once there is anything to miss)."""
        if state.n > last:
            return state.out is not None
        if any(pos not in state.aux for pos in range(state.n, last + 1)):
            self.gaps += bool(state.aux or state.n)  # (before the prompt is fed there is nothing yet)
            return False
        return True

    def _extend(self, items: list[tuple[_State, list[int], int]]) -> None:
        """Caches positions state.n..last of each (state, context, last), all in one pass of the
        head; each state's output at its `last` is where its chain starts."""
        if not items:
            return
        aux = torch.stack([state.aux.pop(pos) for state, _, last in items for pos in range(state.n, last + 1)])
        next_tokens = [t for state, token_ids, last in items for t in token_ids[state.n + 1:last + 2]]
        for state, _, last in items:
            self._hold(state, last + 1)
        pre, normed = self._pass(self.linears["fc"](aux, fp32_out=False),
                                 next_tokens, [(state, state.n, last + 1 - state.n) for state, _, last in items])
        for g, (state, _, last) in enumerate(items):
            state.n = last + 1
            state.out = (pre[g], normed[g])
