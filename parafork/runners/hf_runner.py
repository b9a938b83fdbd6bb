"""The slow fallback `Runner`: any HF causal LM.

Its paged "KV cache" holds, per slot, a *key*: the token written there, its model position,
and what it attended to when it was fed (the key before it in its sequence, and the keys a
join added there). Each step it rebuilds, per slice, every key the slice's new tokens see
(its own entries through its block table, its joined spans, and what those keys saw in
turn), and recomputes them all in one HF forward with a 4-D mask and position ids. Forks, sharing, tail copies, prefix-cache hits, joins and preemption therefore
behave exactly as with the native runner; only the speed differs (every step recomputes each
sequence's whole context).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.runner import BlockCopy, JoinSource, RunnerInfo, SequenceSlice, refuse_trees


@dataclass(frozen=True)
class _Key:
    token: int
    position: int
    prev: int | None  # the key before it in its sequence: it sees what that one saw
    joined: tuple[int, ...] = ()  # keys of joined sequences it sees besides (the slice's first key)


class HFRunner:
    def __init__(self, hf_model, engine_config) -> None:
        self.model = hf_model.to(engine_config.torch_dtype)
        self.block_size = engine_config.block_size
        self.info = RunnerInfo(
            vocab_size=hf_model.get_input_embeddings().weight.shape[0],
            max_position=hf_model.config.max_position_embeddings,
            weight_bytes=sum(p.numel() * p.element_size() for p in hf_model.parameters()),
            prefix_caching=True,
            max_live_sequences=None,
        )
        self.keys: dict[int, _Key] = {}
        self._next_key = 0
        self.slot_key: dict[int, int] = {}  # slot -> key id written there
        self.max_keys = 4 * engine_config.num_kv_blocks * engine_config.block_size  # then unreachable keys go
        self.joined: dict[int, list[tuple[int, int]]] = {}  # seq -> (own entries at the join, key id)
        self.last_slice: dict[int, SequenceSlice] = {}  # seq -> its latest slice (its block table, length)

    def _slot(self, block_table, index: int) -> int:
        return block_table[index // self.block_size] * self.block_size + index % self.block_size

    def fork(self, parent: int, child: int, copy: BlockCopy | None) -> None:
        if copy is not None:
            s, d = copy.src * self.block_size, copy.dst * self.block_size
            for i in range(copy.num_slots):
                if s + i in self.slot_key:
                    self.slot_key[d + i] = self.slot_key[s + i]
        self.joined[child] = list(self.joined.get(parent, []))

    def release(self, seq_id: int) -> None:
        self.joined.pop(seq_id, None)
        self.last_slice.pop(seq_id, None)
        if len(self.keys) > self.max_keys:
            self._collect()

    def _collect(self) -> None:
        """Drops the keys no slot, join or live key reaches (the record would grow forever)."""
        live = set()
        todo = list(self.slot_key.values()) + [k for entries in self.joined.values() for _, k in entries]
        while todo:
            k = todo.pop()
            if k in live or k not in self.keys:
                continue
            live.add(k)
            key = self.keys[k]
            todo.extend(key.joined)
            if key.prev is not None:
                todo.append(key.prev)
        self.keys = {k: v for k, v in self.keys.items() if k in live}

    def truncate(self, seq_id: int, position: int) -> None:
        """Nothing to do: slots past the end are overwritten when those positions are fed again."""

    def join(self, seq_id: int, sources: list[JoinSource]) -> None:
        """Each source's keys from its `start_pos` on: its own entries and what it joined."""
        own = self._own(self.last_slice[seq_id])
        for source in sources:
            last = self.last_slice[source.seq_id]
            seen = self._own(last) + [k for _, k in self.joined.get(source.seq_id, [])]
            self.joined[seq_id] = self.joined.get(seq_id, []) + [
                (len(own), k) for k in seen if self.keys[k].position >= source.start_pos
            ]

    def _own(self, s: SequenceSlice) -> list[int]:
        return [self.slot_key[self._slot(s.block_table, i)] for i in range(s.start + len(s.token_ids))]

    @torch.inference_mode()
    def forward(self, batch: list[SequenceSlice]) -> torch.Tensor:
        refuse_trees(batch, "HF")
        out = []
        for s in batch:
            # Joins made after the slice's first entry are not seen (a recompute from before them).
            joined = tuple(k for at, k in self.joined.get(s.seq_id, []) if at <= s.start)
            prev = self.slot_key[self._slot(s.block_table, s.start - 1)] if s.start else None
            new = []
            for i, token in enumerate(s.token_ids):
                kid, self._next_key = self._next_key, self._next_key + 1
                self.keys[kid] = _Key(token, s.start_pos + i, prev, joined if i == 0 else ())
                self.slot_key[self._slot(s.block_table, s.start + i)] = prev = kid
                new.append(kid)
            self.last_slice[s.seq_id] = s
            out.append(self._logits(new[-s.num_logits :]))
        return torch.cat(out).float()

    def _sees(self, k: int, memo: dict[int, frozenset]) -> frozenset:
        """Every key `k` attended to, itself included."""
        chain = []
        while k is not None and k not in memo:
            chain.append(k)
            k = self.keys[k].prev
        seen = memo[k] if k is not None else frozenset()
        for c in reversed(chain):
            seen = memo[c] = seen | {c, *self.keys[c].joined}
        return seen

    def _logits(self, queries: list[int]) -> torch.Tensor:
        memo: dict[int, frozenset] = {}
        needed, todo = set(), list(queries)
        while todo:  # every key the queries see, and what those saw in turn
            k = todo.pop()
            if k not in needed:
                needed.add(k)
                todo.extend(self._sees(k, memo))
        order = sorted(needed)  # creation order: a key comes after everything it saw
        row = {k: i for i, k in enumerate(order)}
        n = len(order)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for i, k in enumerate(order):
            allowed[i, [row[j] for j in self._sees(k, memo)]] = True
        dtype = self.model.dtype
        bias = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]
        ids = torch.tensor([[self.keys[k].token for k in order]])
        pos = torch.tensor([[self.keys[k].position for k in order]])
        logits = self.model(input_ids=ids, position_ids=pos, attention_mask=bias).logits[0]
        return logits[[row[q] for q in queries]]
