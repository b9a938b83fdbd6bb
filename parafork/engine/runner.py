"""The backend boundary: what the engine asks of a model runner, and nothing more.

A runner holds the weights and the KV storage. The engine owns everything else: which
threads run, their block tables, sampling, forks and restoration. Per step the engine
hands the runner a batch of `SequenceSlice`s (a sequence id that stays the same for the
thread's whole life, the new tokens, the index of the first one in the sequence's own KV,
the block table, and after a join the position offset and the joined KV spans) and gets
back the logits of each slice's last `num_logits` tokens (one, except where the engine
verifies a speculative draft: `speculation.py`). Four explicit calls keep a backend that
addresses KV by sequence (llama.cpp) in step with the engine:

- `fork(parent, child, copy)`: `child` starts with `parent`'s cached context. A paged
  backend shares the full blocks through the block tables it is given and only copies the
  tail block named in `copy`; a sequence-addressed backend tags the parent's cells.
- `release(seq_id)`: the sequence ended (finished, aborted, or preempted to be recomputed
  later under a new id); a sequence-addressed backend frees its cells. Every sequence id
  the engine used is released exactly once.
- `truncate(seq_id, position)`: the sequence keeps its own KV at model positions below
  `position` only (a rejected draft's tail); a paged backend has nothing to do, the engine's
  block manager frees the blocks.
- `join(seq_id, sources)`: from now on the sequence also attends to each source sequence's
  KV from that source's `start_pos` on (a joined child: its own tokens and what it joined);
  a sequence-addressed backend tags those cells with `seq_id` (llama.cpp's `seq_cp`); a
  paged backend has nothing to do, each later slice names its `joined` spans (the HF
  fallback, which recomputes, records which keys the sequence sees from now on). The sources
  are released afterwards; their KV stays as long as the joining sequence attends to it.

`runners/factory.py` builds the runner a configuration names; this module holds the protocol
and its data types only (the runners import it, never the other way round).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

@dataclass(frozen=True)
class KVSpan:
    """Token indices [start, end) of the KV held through `block_table` (a joined child's)."""

    block_table: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SequenceSlice:
    """Work for one sequence (an APAR thread) in one forward: feed `token_ids` as entries
    `start`, `start + 1`, ... of the sequence's own KV (the slots of `block_table`), at model
    positions `start + position_offset`, ...; each attends causally to the sequence's own
    entries and to all of `joined` (KV of other sequences, positions already applied); return
    the logits of its last `num_logits` tokens. Before any join the offset is 0 and nothing
    is joined."""

    seq_id: int
    token_ids: list[int]
    start: int
    block_table: list[int]
    num_logits: int = 1
    position_offset: int = 0
    joined: tuple[KVSpan, ...] = ()
    # A tree of tokens instead of a chain (a trained head's draft with its siblings, engine.py):
    # per token, the index in `token_ids` of the token it follows (-1: the last cached entry).
    # Token i is then at its parent's model position + 1 and attends to the cached entries and
    # to its ancestors in the slice (and itself) only; its K/V are still written at entry
    # `start + i`. Empty: a chain, token i following token i - 1. Only runners whose
    # `RunnerInfo.tree_slices` is set take one.
    parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.parents and (len(self.parents) != len(self.token_ids) or self.parents[0] != -1
                             or any(not -1 <= p < i for i, p in enumerate(self.parents))):
            raise ValueError(f"parents {self.parents} are not a tree over {len(self.token_ids)} tokens "
                             "(one per token, the first -1, each before its token)")

    @property
    def start_pos(self) -> int:
        """Model position of the first token."""
        return self.start + self.position_offset

    def paths(self) -> list[list[int]]:
        """Per token, the indices of its ancestors in the slice and its own, first to last (a
        chain: 0..i)."""
        if not self.parents:
            return [list(range(i + 1)) for i in range(len(self.token_ids))]
        paths: list[list[int]] = []
        for i, p in enumerate(self.parents):
            paths.append((paths[p] if p >= 0 else []) + [i])
        return paths


def refuse_trees(batch: list[SequenceSlice], runner: str) -> None:
    """For runners without `tree_slices`: a clear error rather than a chain's attention."""
    if any(s.parents for s in batch):
        raise ValueError(f"the {runner} runner takes chains only; a slice with parents (a tree) was given")


@dataclass(frozen=True)
class JoinSource:
    """A sequence whose KV from model position `start_pos` on another sequence joins."""

    seq_id: int
    start_pos: int


@dataclass(frozen=True)
class BlockCopy:
    """Copy the first `num_slots` KV slots of block `src` into block `dst` (a fork's tail)."""

    src: int
    dst: int
    num_slots: int


@dataclass(frozen=True)
class StepHidden:
    """A step's logits (as `forward` returns them) and, for every fed row in batch order, the
    residual stream entering each layer asked for, side by side (`aux`, [rows, layers x hidden]),
    and the final normed hidden state (`final`, [rows, hidden]: the LM head's input). What an
    EAGLE-3 draft head reads (draft/head.py); runners that have it offer `forward_hidden`."""

    logits: torch.Tensor
    aux: torch.Tensor
    final: torch.Tensor


@dataclass(frozen=True)
class RunnerInfo:
    vocab_size: int
    max_position: int  # positions the model takes; a thread's context never exceeds it
    weight_bytes: int  # bytes of weights read per forward (for bandwidth figures)
    prefix_caching: bool  # KV written for one sequence may be reused by another through its blocks
    max_live_sequences: int | None  # None: no limit beyond the KV pool
    control_tokens: bool = True  # the model's vocabulary has [Fork]/[Child]: forking modes need them
    gguf: Path | None = None  # the GGUF file the weights come from (llama.cpp), for baselines on the same file
    # One more fed row's cost relative to a one-row step: the fixed estimate used where the
    # step-cost curve is not measured (step_cost.py; it sizes drafts and defers forks).
    draft_row_cost: float = 0.1
    # Decode steps can be timed on an empty pool (step_cost.py): KV paged, nothing recomputed.
    timed_steps: bool = False
    paged: bool = True  # KV addressed by the engine's block tables (False: by sequence id, llama.cpp)
    kernels: str = ""  # what computes the linears, and why where it is not the fastest path (benches print it)
    tree_slices: bool = False  # takes slices whose tokens form a tree (`SequenceSlice.parents`)


@runtime_checkable
class Runner(Protocol):
    info: RunnerInfo

    def forward(self, batch: list[SequenceSlice]) -> torch.Tensor:
        """float32 logits `[sum(num_logits), vocab]`: each slice's last `num_logits` tokens,
        in batch order, positions ascending."""
        ...

    def fork(self, parent: int, child: int, copy: BlockCopy | None) -> None: ...

    def release(self, seq_id: int) -> None: ...

    def truncate(self, seq_id: int, position: int) -> None: ...

    def join(self, seq_id: int, sources: list[JoinSource]) -> None: ...


@runtime_checkable
class HiddenStateRunner(Runner, Protocol):
    """A runner that also gives the target's hidden states: what a trained draft head reads
    (engine/eagle.py). The torch runner is one; llama.cpp's API returns logits and embeddings
    only, and the HF fallback is not offered."""

    def forward_hidden(self, batch: list[SequenceSlice], layers: tuple[int, ...]) -> StepHidden:
        """`forward`, plus every fed row's residual stream entering `layers` and final hidden state."""
        ...

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings of `token_ids`."""
        ...
