"""Drafts from a trained EAGLE-3 head (draft/head.py), per thread, verified like n-gram drafts.

Each thread that speculates with `"eagle"` keeps the head's own key/value cache over its
context: position t holds the head's step-0 keys from the target's hidden states at t (the
residual stream entering three layers, returned for every fed row by the runner's
`forward_hidden`) and the embedding of the token after t. A position enters the cache once its
next token is known, lazily, when the thread next drafts. The draft is then a chain: the head's
output at the thread's last cached position predicts the token after the pending one; each
further token comes from one more step of the head over its own previous output, at the next
position, seeing the cache and the chain's earlier keys (as trained). The engine verifies the
chain exactly as an n-gram draft (speculation.py): greedy output is the same token for token,
and a sampled one is distributed as without drafts (a deterministic chain is a point-mass
draft; the head's argmax is deterministic).

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
target's weight bytes (8,192 tokens), but a pass costs more than its bytes (timed by `time_pass`
on the Zen 4: ~2 ms for one thread against a 10 ms one-row step, +0.15 ms per further thread:
their attention and small ops). So every asking thread goes through one pass per chain step
together, the engine prices a pass as timed and runs the head only where its yield pays for it
(engine.py), and chains stop before tokens below the step's price. Each position of context
costs one row of the layer once. The head's own running confidence (the product of its top
probabilities; calibrated on held-out answers, draft/train.py) is each token's chance for
`speculation.draft_lengths`, which cuts chains as it cuts n-gram drafts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..draft.head import EagleHead


YIELD_DECAY = 0.8  # weight of the head's past steps against the newest (as a thread's n-gram counts)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (halves rotated) of x [R, heads, D], as draft/head.py's `rotate`."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class _Linear:
    """x @ W^T in fp32 out: through the row kernel from packed bf16 weights (a few rows at the cost
    of reading the weights once, as the target's linears) where it is given, else fp32 torch."""

    def __init__(self, weight: torch.Tensor, kernel) -> None:
        self.kernel, self.out_features = kernel, weight.shape[0]
        w = weight.detach()
        self.weight = kernel.pack(w.to(torch.bfloat16).contiguous()) if kernel is not None else w.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            return x.float() @ self.weight.T
        return self.kernel.mm(x.to(torch.bfloat16).contiguous(), self.weight, self.out_features, True)


@dataclass
class _State:
    keys: torch.Tensor  # [capacity, kv heads, head dim]
    values: torch.Tensor
    n: int = 0  # positions 0..n-1 cached
    aux: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> target features, not cached yet
    fork_aux: dict[int, torch.Tensor] = field(default_factory=dict)  # [Fork] position -> features, for children
    out: tuple[torch.Tensor, torch.Tensor] | None = None  # (pre-norm, normed) output at position n - 1
    parent: _State | None = None
    fork_pos: int = -1  # the [Fork]'s position in the parent (children only, until copied)


class HeadDrafter:
    """The per-thread caches of one head; the engine calls `observe` after each forward,
    `propose` when a thread may draft, `fork` and `release` as threads are born and end."""

    def __init__(self, head: EagleHead, embed, fork_id: int, stop_ids: set[int], child_id: int, kernel=None) -> None:
        """`embed`: token ids -> the target's input embeddings; `kernel`: parafork's row kernel
        (runners/row_kernel.py) to run the head's linears in bf16 from packed weights, as the
        target's; None: fp32 torch."""
        self.head = head.eval()
        self.embed = embed
        self.fork_id, self.stop_ids, self.child_id = fork_id, stop_ids, child_id
        c = head.config
        self.group = c.num_attention_heads // c.num_key_value_heads
        self.states: dict[int, _State] = {}
        self.gaps = 0
        self.layers = c.aux_layers
        a, m = head.midlayer.self_attn, head.midlayer.mlp
        # q, k, v as one linear and gate, up as one: a chain step is a few calls, each reading its
        # weights once (the head is ~10M weights; per step its calls' overhead counted as much).
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        self.linears = {name: _Linear(weight, kernel) for name, weight in (
            ("fc", head.fc.weight), ("qkv", qkv), ("o", a.o_proj.weight),
            ("gate_up", torch.cat([m.gate_proj.weight, m.up_proj.weight])), ("down", m.down_proj.weight),
            ("lm", head.lm_head.weight))}
        self.split = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim)
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
        self._cos = self._sin = torch.empty(0, c.head_dim)

    def time_pass(self, threads: int = 16, context: int = 256, rounds: int = 3) -> tuple[float, float]:
        """ms of one pass for one thread and for each further one, timed on made-up threads of
        `context` positions, caches evicted before each pass as a target step evicts them (best
        of `rounds`). Measured on the Zen 4 with the shipped head: 2.1 ms for one thread, +0.27 ms
        per thread (64 threads: 19 ms, a quarter of the target's 64-row step), where its weight
        bytes alone read 0.7 ms: the threads' attention and small ops, not the weights, dominate."""
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

    def record(self, asked: int, drafted: int, accepted: int) -> None:
        """A step's outcome: `asked` threads went through the head, `drafted` of its tokens were
        fed, `accepted` of them held."""
        d = YIELD_DECAY
        self._asked, self._drafted, self._accepted = self._asked * d + asked, self._drafted * d + drafted, self._accepted * d + accepted

    def rest(self) -> None:
        """A step without the head."""
        self._asked, self._drafted, self._accepted = (x * YIELD_DECAY for x in (self._asked, self._drafted, self._accepted))

    def _state(self, thread_id: int) -> _State:
        state = self.states.get(thread_id)
        if state is None:
            c = self.head.config
            empty = torch.empty(64, c.num_key_value_heads, c.head_dim)
            state = self.states[thread_id] = _State(empty, empty.clone())
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
        self.states.pop(thread_id, None)

    @torch.inference_mode()
    def propose(self, asks: list[tuple[int, list[int], int]], min_gain: float = 0.0
                ) -> list[tuple[list[int], list[float]]]:
        """Drafts for several threads at once: per ask (thread id, the thread's context with its
        last token pending, at most k tokens), the draft and the head's running confidence for
        each token; nothing where the cache has a gap.

        The threads go through the head together, one pass per chain step, each linear over
        all their rows at once (weights read once for all: timed here, one thread 2.1 ms, 4
        threads 2.7 ms, 16 threads 5.6 ms; drafting thread by thread cost APAR 0.83x its
        tokens/s). A chain stops before a token whose confidence is below
        `min_gain` (the engine's price of a drafted token: its row and its share of the head's
        passes), so the head does not compute tokens the step could not pay for."""
        results: list[tuple[list[int], list[float]]] = [([], []) for _ in asks]
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
            best, index = logits.max(-1)
            prob = torch.exp(best - torch.logsumexp(logits, -1)).tolist()
            tokens = self.head.draft_to_target[index].tolist()
            going = []
            for (i, state, last, k, feature, _, p), token, q in zip(chains, tokens, prob):
                p *= q  # the head's top probability, chained
                if token == self.child_id or p < min_gain:
                    continue
                results[i][0].append(token)
                results[i][1].append(p)
                if token != self.fork_id and token not in self.stop_ids and j < k - 1:
                    going.append((i, state, last, k, feature, token, p))
            if not going:
                break
            x = self._inputs(torch.stack([g[4] for g in going]), torch.tensor([g[5] for g in going]))
            q, key, value = self._qkv(x, torch.tensor([g[2] + 1 + j for g in going]))
            att = []
            for r, (_, state, *_rest) in enumerate(going):
                self._grow(state, state.n + j + 1)  # the chain's keys go after the cache's, uncounted
                end = state.n + j + 1
                state.keys[end - 1], state.values[end - 1] = key[r], value[r]
                att.append(self._attend(q[r:r + 1], state.keys[:end], state.values[:end], None))
            feature, normed = self._finish(torch.stack([g[4] for g in going]), torch.cat(att))
            chains = [(i, state, last, k, feature[r], normed[r], p) for r, (i, state, last, k, _, _, p) in enumerate(going)]
            j += 1
        return results

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        c = self.head.config
        q, k, v = self.linears["qkv"](x).split([self.split[0], self.split[1], self.split[1]], -1)
        q = q.reshape(len(x), c.num_attention_heads, c.head_dim)
        k = k.reshape(len(x), c.num_key_value_heads, c.head_dim)
        v = v.reshape(len(x), c.num_key_value_heads, c.head_dim)
        cos, sin = self._rope(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [R, 1, D] of `positions` from a table grown as positions grow (draft/head.py's
        `rotate` computes them per call: a pass's worth of small ops each time)."""
        top = int(positions.max()) + 1
        if self._cos.shape[0] < top:
            n = max(top, 2 * self._cos.shape[0], 1024)
            d = self.head.config.head_dim
            angles = torch.arange(n, dtype=torch.float32)[:, None] * (
                1.0 / (self.head.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)))
            self._cos, self._sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _inputs(self, feature: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        m = self.head.midlayer
        return torch.cat([m.input_layernorm(self.embed(next_tokens).float()), m.hidden_norm(feature)], -1)

    def _attend(self, q, keys, values, mask) -> torch.Tensor:
        """q [R, H, D] against keys/values [L, KVH, D]; mask [R, L] (True: seen) or None. Query
        head h reads KV head h // G: the G query heads of a KV head go as G x R rows against its
        keys, which are not copied G times."""
        c, g = self.head.config, self.group
        r, kvh = q.shape[0], c.num_key_value_heads
        q = q.view(r, kvh, g, c.head_dim).permute(1, 2, 0, 3).reshape(kvh, g * r, c.head_dim)
        scores = q @ keys.permute(1, 2, 0) / math.sqrt(c.head_dim)  # [KVH, G*R, L]
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat(g, 1)[None], float("-inf"))
        out = torch.softmax(scores, -1) @ values.transpose(0, 1)  # [KVH, G*R, D]
        return out.view(kvh, g, r, c.head_dim).permute(2, 0, 1, 3).reshape(r, -1)

    def _finish(self, feature, att):
        lin = self.linears
        h = feature + lin["o"](att)
        gate, up = lin["gate_up"](self.head.midlayer.post_attention_layernorm(h)).chunk(2, -1)
        h = h + lin["down"](torch.nn.functional.silu(gate) * up)
        return h, self.head.norm(h)

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
        self._grow(state, fork_pos)
        state.keys[:fork_pos] = parent.keys[:fork_pos]
        state.values[:fork_pos] = parent.values[:fork_pos]
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
        news = [range(state.n, last + 1) for state, _, last in items]
        aux = torch.stack([state.aux.pop(pos) for (state, _, _), new in zip(items, news) for pos in new]).float()
        next_tokens = [t for state, token_ids, last in items for t in token_ids[state.n + 1:last + 2]]
        positions = torch.tensor([pos for new in news for pos in new])
        feature = self.linears["fc"](aux)
        q, key, value = self._qkv(self._inputs(feature, torch.tensor(next_tokens)), positions)
        att, row = [], 0
        for (state, _, last), new in zip(items, news):
            rows = slice(row, row + len(new))
            self._grow(state, last + 1)
            state.keys[state.n:last + 1], state.values[state.n:last + 1] = key[rows], value[rows]
            mask = torch.arange(last + 1)[None, :] <= positions[rows, None] if len(new) > 1 else None
            att.append(self._attend(q[rows], state.keys[:last + 1], state.values[:last + 1], mask))
            row += len(new)
        pre, normed = self._finish(feature, torch.cat(att))
        row = 0
        for (state, _, last), new in zip(items, news):
            row += len(new)
            state.n = last + 1
            state.out = (pre[row - 1], normed[row - 1])

    @staticmethod
    def _grow(state: _State, n: int) -> None:
        if state.keys.shape[0] < n:
            size = max(n, 2 * state.keys.shape[0])
            for name in ("keys", "values"):
                old = getattr(state, name)
                new = old.new_empty(size, *old.shape[1:])
                new[:state.n] = old[:state.n]
                setattr(state, name, new)

