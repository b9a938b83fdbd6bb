"""A `Runner` over llama.cpp (GGUF weights): APAR threads as llama.cpp sequences.

llama.cpp's KV cells carry sets of sequence ids. With one unified cache (`kv_unified`), a
fork is `llama_memory_seq_cp(parent -> child)`: the child's id is added to the parent's
cells, nothing is copied. A release is `llama_memory_seq_rm(seq)`: cells no sequence refers
to any more are free. A join is `llama_memory_seq_cp(child -> parent)` over the child's own
positions: the parent's id is added to the child's cells. One `llama_decode` per engine step carries every slice's tokens, each
tagged with its sequence id, with an output row for each slice's last token.

The engine's block tables are not used here (cells are found by llama.cpp); the engine's
block pool still bounds the KV in use: the context has `num_kv_blocks * block_size` cells
and llama.cpp never needs more cells than the engine counts blocks for (a fork's tail is
shared here, copied there). Cross-request prefix caching is off (`prefix_caching=False`).

Sequence ids are the engine's (`Scheduler.seq_ids`, smallest free first), capped at
`MAX_SEQUENCES` (llama.cpp's `n_seq_max`; it allocates per-sequence state for each).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .llamacpp_api import load
from ..sampling import MAX_DRAFT_TOKENS
from ..engine.runner import BlockCopy, RunnerInfo, SequenceSlice, refuse_trees

MAX_SEQUENCES = 64
GGML_TYPE_F32 = 0  # ggml.h, enum ggml_type


class LlamaCppRunner:
    def __init__(self, gguf: Path, engine_config, vocab_size: int) -> None:
        """`vocab_size`: the tokenizer's; logits of ids the GGUF lacks are -inf."""
        self.ffi, self.lib = ffi, lib = load()
        self.gguf = Path(gguf)
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise ValueError(f"llama.cpp could not load {gguf}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        params = lib.llama_context_default_params()
        # The engine's pool, plus a block per sequence: a fork made while the pool was empty
        # shares its parent's tail cells uncounted (engine/block_manager.py, `paged`).
        params.n_ctx = (engine_config.num_kv_blocks + MAX_SEQUENCES) * engine_config.block_size
        # A step never feeds more tokens than the engine's pool has cells for.
        params.n_batch = params.n_ubatch = min(engine_config.max_batch_tokens, params.n_ctx)
        params.n_seq_max = MAX_SEQUENCES
        # Output rows: one per slice (at most one slice per sequence), plus a draft's (speculation.py).
        params.n_outputs_max = MAX_SEQUENCES * (1 + MAX_DRAFT_TOKENS)
        params.n_outputs_max_per_seq = 1 + MAX_DRAFT_TOKENS
        params.kv_unified = True  # one cache for all sequences: only then do forks share cells
        if engine_config.quant == "f32":  # exact weights: keep the KV cache exact too (llama.cpp's default is f16)
            params.type_k = params.type_v = GGML_TYPE_F32
            params.flash_attn_type = 0  # disabled: its CPU kernel rounds the queries to f16
        threads = engine_config.cpu_threads or torch.get_num_threads()
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if self.ctx == ffi.NULL:
            lib.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context of {params.n_ctx} cells for {gguf}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.capacity = params.n_batch
        self.batch = lib.llama_batch_init(self.capacity, 0, 1)
        self.info = RunnerInfo(
            vocab_size=max(vocab_size, self.n_vocab),
            max_position=lib.llama_model_n_ctx_train(self.model),
            weight_bytes=lib.llama_model_size(self.model),
            prefix_caching=False,
            paged=False,
            max_live_sequences=MAX_SEQUENCES,
            control_tokens=vocab_size <= self.n_vocab,  # the control tokens come last in the tokenizer
            gguf=self.gguf,
            # This build's extra rows are dear (2-core AVX2 EPYC, Q8_0): a step of 1/8 sequences took
            # 10.7/41.5 ms (0.4 per row), and drafted positions cost more still: at 0.4, coding answers
            # accepted 1.31 draft tokens per step and ran no faster (about 0.7 per drafted row).
            draft_row_cost=0.7,
        )
        self.live: set[int] = set()  # sequence ids holding cells

    def __del__(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is not None and getattr(self, "ctx", None) is not None:
            lib.llama_batch_free(self.batch)
            lib.llama_free(self.ctx)
            lib.llama_model_free(self.model)
            self.ctx = None

    def fork(self, parent: int, child: int, copy: BlockCopy | None) -> None:
        """The child's id is added to every cell of the parent (no copy, tail included)."""
        self.lib.llama_memory_seq_rm(self.memory, child, -1, -1)
        self.lib.llama_memory_seq_cp(self.memory, parent, child, -1, -1)
        self.live.add(child)

    def release(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        self.live.discard(seq_id)

    def truncate(self, seq_id: int, position: int) -> None:
        """Drops the sequence's cells at positions >= `position` (a rejected draft's)."""
        self.lib.llama_memory_seq_rm(self.memory, seq_id, position, -1)

    def join(self, seq_id: int, sources) -> None:
        """Each source's cells from its `start_pos` on get `seq_id` too (no copy): the joined
        child's own tokens and what it joined itself, never the parent's cells it shares.
        Positions repeat across the parent and its children; llama.cpp masks by position per
        sequence, and the parent's next position (its largest + 1) is what the engine feeds."""
        for source in sources:
            self.lib.llama_memory_seq_cp(self.memory, source.seq_id, seq_id, source.start_pos, -1)

    def cells_in_use(self, seq_id: int) -> tuple[int, int]:
        """(first, last) position the sequence holds, (-1, -1) when it holds none."""
        return self.lib.llama_memory_seq_pos_min(self.memory, seq_id), self.lib.llama_memory_seq_pos_max(self.memory, seq_id)

    @torch.inference_mode()
    def forward(self, batch: list[SequenceSlice]) -> torch.Tensor:
        refuse_trees(batch, "llama.cpp")
        lib, b = self.lib, self.batch
        total = sum(len(s.token_ids) for s in batch)
        if total > self.capacity:
            raise ValueError(f"{total} tokens in one step; the llama.cpp batch holds {self.capacity}")
        n = 0
        for s in batch:
            if s.start_pos <= lib.llama_memory_seq_pos_max(self.memory, s.seq_id):
                # Recomputing from here (a fork without its tail): drop what the sequence holds beyond.
                lib.llama_memory_seq_rm(self.memory, s.seq_id, s.start_pos, -1)
            for i, token in enumerate(s.token_ids):
                if not 0 <= token < self.n_vocab:
                    raise ValueError(f"token id {token} is not in this GGUF's vocabulary of {self.n_vocab}")
                b.token[n] = token
                b.pos[n] = s.start_pos + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s.seq_id
                b.logits[n] = i >= len(s.token_ids) - s.num_logits
                n += 1
            self.live.add(s.seq_id)
        b.n_tokens = n
        code = lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}" + (" (no free KV cells)" if code == 1 else ""))
        # Output rows are stored contiguously, in batch order: one copy for all of them.
        rows = sum(s.num_logits for s in batch)
        rows_logits = np.frombuffer(self.ffi.buffer(lib.llama_get_logits(self.ctx), 4 * rows * self.n_vocab),
                                    dtype=np.float32).reshape(rows, self.n_vocab)
        out = torch.from_numpy(rows_logits.copy())
        if self.info.vocab_size > self.n_vocab:  # tokenizer ids the GGUF lacks (the control tokens)
            out = torch.cat([out, out.new_full((rows, self.info.vocab_size - self.n_vocab), float("-inf"))], 1)
        return out


def reference_greedy(gguf: Path, prompt_ids: list[int], max_tokens: int, threads: int, stop_ids=(),
                     banned=()) -> tuple[list[int], float]:
    """llama.cpp on its own: one sequence, the prompt in one `llama_decode`, then one token
    per call, argmax of the logits; no engine. (token ids, seconds from the prompt's decode
    to the last token, as an engine request's wall time counts them).
    The baseline of `bench engine --backend llamacpp` and the oracle of its tests."""
    import time

    ffi, lib = load()
    model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
    if model == ffi.NULL:
        raise ValueError(f"llama.cpp could not load {gguf}")
    params = lib.llama_context_default_params()
    params.n_ctx = len(prompt_ids) + max_tokens + 1
    params.n_batch = params.n_ubatch = max(len(prompt_ids), 1)
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    ctx = lib.llama_init_from_model(model, params)
    batch = lib.llama_batch_init(max(len(prompt_ids), 1), 0, 1)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    try:
        def decode(tokens: list[int], start: int) -> np.ndarray:
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, 0
                batch.seq_id[i][0] = 0
            batch.logits[len(tokens) - 1] = 1
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, len(tokens) - 1), 4 * n_vocab), dtype=np.float32)

        start = time.perf_counter()
        logits = decode(list(prompt_ids), 0)
        out: list[int] = []
        while len(out) < max_tokens:
            if banned:
                logits = logits.copy()
                logits[[b for b in banned if b < n_vocab]] = -np.inf
            token = int(logits.argmax())
            out.append(token)
            if token in stop_ids or len(out) == max_tokens:
                break
            logits = decode([token], len(prompt_ids) + len(out) - 1)
        return out, time.perf_counter() - start
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
