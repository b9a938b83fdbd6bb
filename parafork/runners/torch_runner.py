"""Batched Llama-family forward over a paged KV cache.

One `Runner` (see runner.py): a batch of sequence slices in (new token ids, first position,
block table, joined spans), logits of each slice's last token out. KV is addressed by block
table alone, so a fork only copies the tail block it is told to, and a release or a join has
nothing to do: a joined slice gathers its spans' slots in front of its own (no copy). It
knows nothing about requests, APAR threads or sampling.

Design choices for CPU decode (measured, see RESOURCES.md):
- one flat token dimension for the linear layers (prefill and decode rows mixed, no padding);
  queries are padded per sequence only inside attention;
- decode attention is plain matmul grouped by KV head (bf16 SDPA is pathological on CPU); a
  long slice (a prefill chunk) attends alone through PyTorch's fused attention in fp32, which
  never builds the [keys x queries] scores: 2,048-token prefill 15.6 -> 4.6 s on the 2-core EPYC;
- the KV cache is one preallocated tensor per layer, `[slots, 2, kv_heads, head_dim]`,
  slot = block * block_size + offset; a step gathers each sequence's slots once per layer;
- decode rows whose block tables share full blocks (APAR siblings under their ancestors, or
  prompts through the prefix cache) attend to that prefix once, in one matmul for all their
  queries, merged with each one's own keys by log-sum-exp (`_SharedPrefix`), where that saves
  at least `MIN_SAVED_KEYS` key reads: 16 threads over 800 keys 318 -> 129 ms a step, 8 over
  400 90 -> 74 ms (2-core EPYC, fp32); below the threshold the extra small ops cost more;
- q/k/v and gate/up are fused into one matmul each, the softmax scale is folded into the
  query weights, and the weights are pre-packed for oneDNN (about 2x faster GEMV in bf16;
  in fp32 it is what lets extra rows come nearly free on AVX2-only CPUs);
- in bf16, where the CPU has AVX-512 BF16, the linears, the residual add + RMS norm and the
  decode rows' attention go through parafork's row kernel (`row_kernel.py`), built once per
  machine: SmolLM2-135M's step 23.4 -> 11.9 ms at one row, 8 rows 1.45x one row (was 1.55x),
  on the 2-core Zen 5 (`results/rows/`). Its attention reads each key in place, so decode rows
  skip the shared-prefix split, which exists to save gathers and matmul work;
- a tree slice (a head's draft with siblings, `SequenceSlice.parents`) writes its K/V at its rows'
  own entries as a chain does, and only its attention changes: each row's keys are the context's
  then its path's (the row kernel reads a per-row slot list anyway; the padded and long paths mask
  the slice's other entries), at its depth's position.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import cpu_has_fast_bf16
from . import row_kernel
from ..engine.runner import BlockCopy, RunnerInfo, SequenceSlice, StepHidden

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class _Linear:
    """y = x @ W^T + b: through parafork's row kernel (`row_kernel.py`) where it is loaded (bf16),
    else with oneDNN-packed weights where oneDNN has kernels for the dtype.

    oneDNN packing pays in fp32 too: on an AVX2 EPYC, MKL's fp32 GEMM for 1-16 rows ran the
    SmolLM2 linear stack in 44/71/113/164/189 ms, oneDNN's packed one in 32/34/41/51/82 ms.
    The row kernel runs 16 rows at a time; a longer input (a prefill chunk, a wide batch) goes
    through in one call, its 16-row chunks over the same L2-resident group of weights (30 layers'
    linears on the 2-core Zen 5: 64 rows 17.3 ms, against 19.8 ms for 16-row calls one after the
    other and 30.8 ms through oneDNN).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, kernel=None,
                 fp32_out: bool = False, int8=None) -> None:
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.out_features = weight.shape[0]
        self.fp32_out = fp32_out
        if int8 is not None:  # int8 weights (kernels/int8.h): quantized from the full-precision source
            self.weight = int8.pack_int8(weight.detach().float())
            self.kernel, self.packed, self.int8 = (int8 if int8 is kernel else None), False, int8
            self.nbytes = self.weight.numel()
            return
        self.int8 = None
        weight = weight.detach().to(dtype).contiguous()
        self.kernel = kernel if dtype == torch.bfloat16 else None
        self.packed = self.kernel is None and ((dtype == torch.float32 and torch.backends.mkldnn.is_available()) or (
            dtype == torch.bfloat16 and cpu_has_fast_bf16()
        ))
        if self.kernel is not None:
            self.weight = self.kernel.pack(weight)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if self.packed else weight
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None or self.int8 is not None:
            y = (self.kernel or self.int8).mm(x, self.weight, self.out_features, self.fp32_out)
            return y if self.bias is None else y + self.bias
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return y.float() if self.fp32_out else y


class _Layer:
    def __init__(self, hf_layer, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, kernel,
                 int8=None) -> None:
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        scale = 1.0 / math.sqrt(head_dim)
        q_w, q_b = attn.q_proj.weight * scale, attn.q_proj.bias
        q_b = None if q_b is None else q_b * scale
        biases = [b for b in (q_b, attn.k_proj.bias, attn.v_proj.bias) if b is not None]
        self.qkv = _Linear(
            torch.cat([q_w, attn.k_proj.weight, attn.v_proj.weight]),
            torch.cat(biases) if biases else None,
            dtype,
            kernel,
            int8=int8,
        )
        self.o = _Linear(attn.o_proj.weight, attn.o_proj.bias, dtype, kernel, int8=int8)
        self.gate_up = _Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None, dtype, kernel, int8=int8)
        self.down = _Linear(mlp.down_proj.weight, None, dtype, kernel, int8=int8)
        self.input_norm = hf_layer.input_layernorm.weight.detach().to(dtype)
        self.post_norm = hf_layer.post_attention_layernorm.weight.detach().to(dtype)


@dataclass
class _SharedPrefix:
    """KV entries that several sequences of a decode group read through the same blocks (APAR
    siblings' common ancestors, or one prompt through the prefix cache): attended once for all
    their queries, then merged with each sequence's own remaining keys by log-sum-exp."""

    members: torch.Tensor  # [m] indices of the sequences in the group
    slots: torch.Tensor  # [P] KV slots of the prefix, in order


@dataclass
class _AttentionGroup:
    """Slices attended together in one padded batched matmul: queries padded to the group's
    longest slice, keys to its longest context."""

    rows: torch.Tensor | None  # [T_g] flat rows of the group's tokens; None: the whole step, in order
    gather_slots: torch.Tensor  # [B*L] slots of each sequence's whole context, sequence-major
    attn_bias: torch.Tensor | None  # [B, 1, L, G*Q] 0 or -inf; None for a long slice (below)
    long_mask: torch.Tensor | None  # a long slice alone: [1, 1, Q, L] bool (True: may attend), or None
    causal: bool  # a long slice alone whose keys are exactly its queries: plain causal attention
    shared: list[_SharedPrefix]  # prefixes attended once; `gather_slots` then holds only the rest
    num_seqs: int
    max_kv: int
    query_index: torch.Tensor | None  # [B*Q] rows of the group's tokens, None when Q == 1
    valid_rows: torch.Tensor | None  # [T_g] rows of the padded [B*Q] layout that are real
    max_q: int
    # Short slices through the row kernel's attention: keys per query row (`gather_slots` as
    # [rows, L], the part after any shared prefix; `kv_lens` per row), and the shared prefixes
    # in the kernel's form (`_kernel_prefixes`; `shared` stays empty on this path).
    kv_lens: torch.Tensor | None = None
    kernel_prefixes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


@dataclass
class _StepInputs:
    """Index tensors shared by all layers of one forward."""

    token_ids: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D] (sign of the first half already flipped)
    groups: list[_AttentionGroup]
    last_rows: torch.Tensor  # flat rows of each sequence's last num_logits tokens


class TorchRunner:
    SMALL_ATTENTION = 1024  # keys x sequences below which attention runs in fp32 (faster on CPU)
    SHORT_SLICE = 16  # tokens: slices up to this long (decode, drafts) share one attention group
    # Decode rows sharing a prefix read it once when that saves at least this many key reads
    # ((sharers - 1) x prefix keys); below it the merge's extra small ops cost more than they save.
    MIN_SAVED_KEYS = 1024

    def __init__(self, hf_model, engine_config) -> None:
        """Takes its own (packed, `engine_config.torch_dtype`) copy of `hf_model`'s weights."""
        config = hf_model.config
        dtype, num_blocks, block_size = engine_config.torch_dtype, engine_config.num_kv_blocks, engine_config.block_size
        arch = (config.architectures or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.eps = config.rms_norm_eps
        # The row kernel for bf16 (built once per machine), unless the config turns it off.
        kernel = None
        self.linear_path = "off (row_kernel=False)" if not engine_config.row_kernel else "not used (float32)"
        if engine_config.row_kernel and dtype == torch.bfloat16:
            kernel = row_kernel.load()
            self.linear_path = "on" if kernel is not None else f"off: {row_kernel.unavailable()}"
            if kernel is None:
                log.warning("linear layers through oneDNN: %s", row_kernel.unavailable())
        self.kernel = kernel
        # Int8 weights (`quant="int8"`): every linear, the tied LM head too; computed by the row
        # kernel (AVX-512 VNNI) inside its fused decode loop, else by the AVX2 build, layer by layer.
        int8 = row_kernel.load_int8() if engine_config.quant == "int8" else None
        self.quant = f"int8 ({int8.int8_path})" if int8 is not None else None
        self._no_delta = torch.empty(0, dtype=dtype)
        with torch.no_grad():
            self.layers = [
                _Layer(layer, self.num_heads, self.num_kv_heads, self.head_dim, dtype, kernel, int8)
                for layer in hf_model.model.layers
            ]
            self.embed = hf_model.get_input_embeddings().weight.detach().to(dtype)
            self.final_norm = hf_model.model.norm.weight.detach().to(dtype)
            self.lm_head = _Linear(hf_model.get_output_embeddings().weight, None, dtype, kernel, fp32_out=True, int8=int8)
        # The row kernel's decode loop (`forward`) takes every layer's packed weights at once;
        # layers with biases (qkv) keep the Python loop, which adds them.
        linears = [(l.qkv, l.o, l.gate_up, l.down) for l in self.layers]
        self._fused = None
        if kernel is not None and all(lin.bias is None and lin.kernel is not None for ls in linears for lin in ls):
            self._fused = ([t for l, ls in zip(self.layers, linears) for t in [*(lin.weight for lin in ls), l.input_norm,
                                                                                 l.post_norm]],
                           [lin.out_features for ls in linears for lin in ls])
        weight_bytes = self.lm_head.nbytes + sum(l.qkv.nbytes + l.o.nbytes + l.gate_up.nbytes + l.down.nbytes for l in self.layers)
        self.max_position = config.max_position_embeddings
        self.info = RunnerInfo(
            vocab_size=self.embed.shape[0],
            max_position=self.max_position,
            weight_bytes=weight_bytes,
            prefix_caching=True,
            max_live_sequences=None,
            # Step of 1/8 rows: 49.3/78.8 ms on a 2-core AVX2 EPYC (fp32), 12.7/17.3 ms on Zen 5 (bf16,
            # oneDNN); through the row kernel 6.9/8.1 ms (16 rows 8.4; results/rows/engine.txt).
            draft_row_cost=0.02 if kernel is not None else 0.08,
            timed_steps=True,
            kernels=f"row kernel {self.linear_path}" + (f", weights {self.quant}" if self.quant else ""),
            tree_slices=True,
        )
        self._init_rope(config)
        # Slot num_blocks*block_size is a scratch slot: padded keys point there.
        self.kv_cache = [
            torch.zeros(num_blocks * block_size + 1, 2, self.num_kv_heads, self.head_dim, dtype=dtype)
            for _ in self.layers
        ]
        self._gathered = torch.empty(0, 2, self.num_kv_heads, self.head_dim, dtype=dtype)  # _gather_buffer

    def _init_rope(self, config) -> None:
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rope.get('rope_type')} is not supported yet")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        half = self.head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32) * 2 / self.head_dim))
        angles = torch.outer(torch.arange(self.max_position, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        # rotate_half(x) * sin == roll(x, half) * signed_sin, which saves a neg and a cat per layer.
        sign = torch.cat([-torch.ones(half), torch.ones(half)])
        self.cos_table = angles.cos().to(self.dtype)
        self.sin_table = (angles.sin() * sign).to(self.dtype)

    def fork(self, parent: int, child: int, copy: BlockCopy | None) -> None:
        """Full blocks are shared through the block tables; only the tail block is copied."""
        if copy is not None:
            s, d, n = copy.src * self.block_size, copy.dst * self.block_size, copy.num_slots
            for cache in self.kv_cache:
                cache[d : d + n].copy_(cache[s : s + n])

    def release(self, seq_id: int) -> None:
        """Nothing to do: a sequence's KV is its blocks, which the engine's block manager frees."""

    def truncate(self, seq_id: int, position: int) -> None:
        """Nothing to do: slots past the end are overwritten when those positions are fed again."""

    def join(self, seq_id: int, sources) -> None:
        """Nothing to do: each later slice names the joined spans, attended where they lie."""

    def _prepare(self, batch: list[SequenceSlice]) -> _StepInputs:
        bs = self.block_size
        q_lens = [len(s.token_ids) for s in batch]
        if max(s.start_pos + q for s, q in zip(batch, q_lens)) > self.max_position:
            raise ValueError(f"a position beyond the model's {self.max_position} positions")
        q_len_t = torch.tensor(q_lens)
        row_starts = torch.cumsum(q_len_t, 0) - q_len_t
        # Where each new token's K/V goes, and its position.
        seq_of_row = torch.repeat_interleave(torch.arange(len(batch)), q_len_t)
        own = [torch.arange(s.start, s.start + q) for s, q in zip(batch, q_lens)]
        own_index = torch.cat(own)
        slot_mapping = torch.cat([torch.tensor(s.block_table[: (s.start + q + bs - 1) // bs], dtype=torch.long)[k // bs] * bs
                                  + k % bs for s, q, k in zip(batch, q_lens, own)])
        flat_pos = own_index
        if any(s.parents for s in batch):  # a tree's token sits one position after its parent
            flat_pos = torch.cat([torch.tensor([s.start + len(path) - 1 for path in s.paths()]) if s.parents else o
                                  for s, o in zip(batch, own)])  # (a chain's own entries: no paths built for a prefill)
        if any(s.position_offset for s in batch):  # after a join
            flat_pos = flat_pos + torch.tensor([s.position_offset for s in batch])[seq_of_row]
        # Decode rows (and drafts) attend together; a long slice (a prefill chunk) on its own, so
        # that decode rows are not padded to its length (padding all of them to a 2048-token chunk
        # made a continuous-batching step with one prompt admitted cost ~100x a decode step).
        short = [i for i, q in enumerate(q_lens) if q <= self.SHORT_SLICE]
        groups = [short] if short else []
        groups += [[i] for i, q in enumerate(q_lens) if q > self.SHORT_SLICE]
        whole = len(groups) == 1
        token_ids = torch.tensor([t for s in batch for t in s.token_ids], dtype=torch.long)
        return _StepInputs(
            token_ids=token_ids,
            slot_mapping=slot_mapping,
            cos=self.cos_table[flat_pos][:, None, :],
            sin=self.sin_table[flat_pos][:, None, :],
            groups=[self._group([batch[i] for i in g], None if whole else
                                torch.cat([torch.arange(row_starts[i], row_starts[i] + q_lens[i]) for i in g]))
                    for g in groups],
            last_rows=self._logit_rows(batch, (row_starts + q_len_t).tolist()),
        )

    def _group(self, batch: list[SequenceSlice], rows: torch.Tensor | None) -> _AttentionGroup:
        bs = self.block_size
        q_lens = [len(s.token_ids) for s in batch]
        own_lens = [s.start + q for s, q in zip(batch, q_lens)]  # own KV entries after this step
        # Keys of sequence b: its joined spans' slots (all visible), then its own entries (causal).
        span_slots = [self._span_slots(s.joined) for s in batch]
        num_joined = [len(x) for x in span_slots]
        # Own keys from `skip` on: the shared prefix before it is attended once for all its sharers.
        skip, shared = [0] * len(batch), []
        # Short slices and the row kernel: its attention reads every key in place and a shared
        # prefix's chunks once for all its sharers, at no cost of its own (no gather, no merge of
        # small ops), so any prefix that two sequences share is split off. (Only one-token slices
        # went this way at first; a step with a fork's or a draft's few tokens then took the
        # padded matmul path for all its rows: 32 APAR requests, 35 of 40 steps, a third of the time.)
        kernel_decode = self.kernel is not None and self.head_dim % 16 == 0 and max(q_lens) <= self.SHORT_SLICE
        if len(batch) > 1 and max(q_lens) <= self.SHORT_SLICE:
            skip, shared = self._shared_prefixes(batch, min_saved_keys=1 if kernel_decode else self.MIN_SAVED_KEYS)
        kv_lens = [j + n - k for j, n, k in zip(num_joined, own_lens, skip)]
        max_q, max_kv = max(q_lens), max(kv_lens)
        num_b = len(batch)
        max_blocks = (max(own_lens) + bs - 1) // bs
        scratch_block = self.num_blocks  # slot num_blocks*bs is the scratch slot
        tables = torch.full((num_b, max_blocks), scratch_block, dtype=torch.long)
        for i, s in enumerate(batch):
            n = (own_lens[i] + bs - 1) // bs
            tables[i, :n] = torch.tensor(s.block_table[:n], dtype=torch.long)
        key_pos = torch.arange(max_kv)
        if not any(num_joined) and not shared:
            own_index = key_pos[None, :].expand(num_b, max_kv)  # [B, L] index of each key in the own KV
            gather_slots = tables[:, key_pos // bs] * bs + key_pos % bs
        else:
            own_index = key_pos[None, :] - torch.tensor(num_joined)[:, None] + torch.tensor(skip)[:, None]
            idx = own_index.clamp(min=0, max=max_blocks * bs - 1)
            gather_slots = tables.gather(1, idx // bs) * bs + idx % bs
            for i, slots in enumerate(span_slots):
                if slots:
                    gather_slots[i, : len(slots)] = torch.tensor(slots, dtype=torch.long)
        kv_len_t = torch.tensor(kv_lens)
        gather_slots = torch.where(key_pos[None, :] < kv_len_t[:, None], gather_slots, scratch_block * bs)
        if kernel_decode:
            # One query row at a time: a slice of q tokens (a fork's first tokens, a draft) is q
            # rows with the slice's keys, row i seeing its own entries up to itself (causal).
            prefix_slots, prefix_lens, prefix_of = self._kernel_prefixes(shared, num_b)
            if max(q_lens) > 1:
                q_len_t = torch.tensor(q_lens)
                seq = torch.repeat_interleave(torch.arange(num_b), q_len_t)
                later = torch.cat([torch.arange(q - 1, -1, -1) for q in q_lens])  # queries after row i in its slice
                own_keys = gather_slots
                gather_slots, kv_len_t = gather_slots[seq], kv_len_t[seq] - later
                prefix_of = prefix_of[seq] if len(prefix_of) else prefix_of
                row = 0
                for b, s in enumerate(batch):  # a tree's row: the context's keys, then its path's
                    if s.parents:
                        context = kv_lens[b] - q_lens[b]
                        for i, path in enumerate(s.paths()):
                            gather_slots[row + i, context:context + len(path)] = own_keys[b, context + torch.tensor(path)]
                            kv_len_t[row + i] = context + len(path)
                    row += q_lens[b]
            return _AttentionGroup(rows=rows, gather_slots=gather_slots, attn_bias=None, long_mask=None, causal=False,
                                   shared=[], num_seqs=num_b, max_kv=max_kv, query_index=None, valid_rows=None,
                                   max_q=1, kv_lens=kv_len_t, kernel_prefixes=(prefix_slots, prefix_lens, prefix_of))

        # Query positions, padded per sequence to max_q (padding repeats the last real query).
        offsets = torch.arange(max_q)
        q_len_t = torch.tensor(q_lens)
        start_t = torch.tensor([s.start for s in batch])
        q_index = start_t[:, None] + torch.minimum(offsets[None, :], (q_len_t - 1)[:, None])  # [B, Q] own entry
        valid = offsets[None, :] < q_len_t[:, None]

        # Joined keys (own_index < 0) are visible to every query; own keys causally.
        allowed = own_index[:, :, None] <= q_index[:, None, :]  # [B, L, Q]
        for b, s in enumerate(batch):  # a tree's query sees its path's entries only, of the slice's
            if s.parents:
                path_of = torch.zeros(q_lens[b], q_lens[b], dtype=torch.bool)
                for i, path in enumerate(s.paths()):
                    path_of[i, path] = True
                entry = own_index[b] - s.start
                inside = (entry >= 0) & (entry < q_lens[b])
                query = torch.clamp(offsets, max=q_lens[b] - 1)
                allowed[b, inside] = path_of[query][:, entry[inside]].T
        if num_b == 1 and max_q > self.SHORT_SLICE:  # a prefill chunk: fused attention, no bias
            causal = max_kv == max_q and not any(num_joined) and not batch[0].parents
            return _AttentionGroup(rows=rows, gather_slots=gather_slots.reshape(-1), attn_bias=None,
                                   long_mask=None if causal else allowed.transpose(1, 2)[:, None],
                                   causal=causal, shared=[], num_seqs=1, max_kv=max_kv, query_index=None, valid_rows=None,
                                   max_q=max_q)
        bias = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))
        # Query columns are ordered (group, query) inside each KV head.
        bias = bias[:, None, :, None].expand(num_b, 1, max_kv, self.group, max_q).reshape(num_b, 1, max_kv, -1)

        row_starts = torch.cumsum(q_len_t, 0) - q_len_t
        if max_q == 1:
            query_index = valid_rows = None
        else:
            query_index = (row_starts[:, None] + torch.minimum(offsets[None, :], (q_len_t - 1)[:, None])).reshape(-1)
            valid_rows = torch.nonzero(valid.reshape(-1)).squeeze(1)
        return _AttentionGroup(
            rows=rows,
            gather_slots=gather_slots.reshape(-1),
            attn_bias=bias.contiguous(),
            long_mask=None,
            causal=False,
            shared=shared,
            num_seqs=num_b,
            max_kv=max_kv,
            query_index=query_index,
            valid_rows=valid_rows,
            max_q=max_q,
        )

    @staticmethod
    def _kernel_prefixes(shared: list[_SharedPrefix], num_b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The row kernel's form of the shared prefixes: slots [P, longest] (padded), lengths [P]
        and, per sequence, the index of its prefix (-1: none)."""
        if not shared:
            return torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        longest = max(len(p.slots) for p in shared)
        slots = torch.zeros(len(shared), longest, dtype=torch.long)
        prefix_of = torch.full((num_b,), -1, dtype=torch.long)
        for i, p in enumerate(shared):
            slots[i, : len(p.slots)] = p.slots
            prefix_of[p.members] = i
        return slots, torch.tensor([len(p.slots) for p in shared]), prefix_of

    def _shared_prefixes(self, batch: list[SequenceSlice], min_saved_keys: int) -> tuple[list[int], list[_SharedPrefix]]:
        """Per sequence, how many of its own KV entries a shared prefix covers (0: none), and the
        prefixes. Sequences without joins whose block tables start with the same block share the
        full blocks their tables have in common that lie before every one of their queries, where
        that saves at least `min_saved_keys` key reads."""
        bs = self.block_size
        by_first: dict[int, list[int]] = {}
        for i, s in enumerate(batch):
            if not s.joined and s.start >= bs:
                by_first.setdefault(s.block_table[0], []).append(i)
        skip, shared = [0] * len(batch), []
        for members in by_first.values():
            if len(members) < 2:
                continue
            tables = [batch[i].block_table for i in members]
            limit = min(batch[i].start for i in members) // bs
            n = 0
            while n < limit and all(t[n] == tables[0][n] for t in tables):
                n += 1
            if n == 0 or (len(members) - 1) * n * bs < min_saved_keys:
                continue
            for i in members:
                skip[i] = n * bs
            blocks = torch.tensor(tables[0][:n], dtype=torch.long)
            slots = (blocks[:, None] * bs + torch.arange(bs)[None, :]).reshape(-1)
            shared.append(_SharedPrefix(members=torch.tensor(members), slots=slots))
        return skip, shared

    def _span_slots(self, spans) -> list[int]:
        bs = self.block_size
        return [span.block_table[i // bs] * bs + i % bs for span in spans for i in range(span.start, span.end)]

    @staticmethod
    def _logit_rows(batch: list[SequenceSlice], ends: list[int]) -> torch.Tensor:
        """Flat rows of each slice's last `num_logits` tokens (`ends`: one past each slice's last row)."""
        if all(s.num_logits == 1 for s in batch):
            return torch.tensor(ends) - 1
        return torch.tensor([r for s, end in zip(batch, ends) for r in range(end - s.num_logits, end)])

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, HF's rounding (the activation rounded to the dtype before the product)."""
        if self.kernel is not None:
            return self.kernel.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """x += delta (the residual, in place; `x` is this step's own tensor), then the RMS norm of x:
        one call of the row kernel in bf16, else one fused op (fp32 accumulation) instead of HF's eight."""
        if self.kernel is not None:
            return self.kernel.add_rms_norm(x, self._no_delta if delta is None else delta, weight, self.eps)
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _attention(self, layer_idx: int, qkv: torch.Tensor, inp: _StepInputs) -> torch.Tensor:
        h, kvh, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        t = qkv.shape[0]
        cache = self.kv_cache[layer_idx]
        if self.kernel is not None:  # rotary q/k and the cache write in one call
            q = self.kernel.rope_cache(qkv, inp.cos, inp.sin, cache, inp.slot_mapping, h)
        else:
            qkv = qkv.view(t, h + 2 * kvh, d)
            qk = qkv[:, : h + kvh]
            qk = torch.addcmul(qk * inp.cos, qk.roll(d // 2, dims=-1), inp.sin)
            kv_new = torch.cat([qk[:, h:], qkv[:, h + kvh :]], dim=1).view(t, 2, kvh, d)
            cache.index_copy_(0, inp.slot_mapping, kv_new)
            q = qk[:, :h]
        if len(inp.groups) == 1:
            return self._group_attention(q, cache, inp.groups[0])
        out = torch.empty(t, h * d, dtype=self.dtype)
        for group in inp.groups:
            out.index_copy_(0, group.rows, self._group_attention(q.index_select(0, group.rows), cache, group))
        return out

    def _group_attention(self, q: torch.Tensor, cache: torch.Tensor, grp: _AttentionGroup) -> torch.Tensor:
        """[T_g, H*D] attention output of one group's queries `q` ([T_g, H, D], its rows in order)."""
        h, kvh, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        num_b, max_q = grp.num_seqs, grp.max_q
        if grp.kv_lens is not None:
            return self.kernel.decode_attention(q, cache, grp.gather_slots, grp.kv_lens, *grp.kernel_prefixes)
        if grp.attn_bias is None:
            return self._long_slice_attention(q, cache, grp)
        if grp.query_index is not None:
            q = q.index_select(0, grp.query_index)
        # [B*Q, H, D] -> [B, KVH, G*Q, D]
        q = q.reshape(num_b, max_q, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(num_b, kvh, g * max_q, d)
        # index_select is ~4x faster than advanced indexing here; K @ Q^T beats Q @ K^T
        # because it keeps the gathered keys' rows contiguous.
        kv = torch.index_select(cache, 0, grp.gather_slots, out=self._gather_buffer(len(grp.gather_slots)))
        kv = kv.view(num_b, grp.max_kv, 2, kvh, d)
        # oneDNN's bf16 batched matmul costs ~100 us even when tiny; MKL's fp32 one does not.
        small = num_b * grp.max_kv <= self.SMALL_ATTENTION
        if small or grp.shared:
            kv, q = kv.float(), q.float()
        k = kv[:, :, 0].transpose(1, 2)  # [B, KVH, L, D]
        v = kv[:, :, 1].transpose(1, 2)  # [B, KVH, L, D]
        scores = torch.matmul(k, q.transpose(-1, -2)) + grp.attn_bias  # [B, KVH, L, G*Q]
        if grp.shared:
            lse = torch.logsumexp(scores, dim=2)  # [B, KVH, G*Q]
            out = torch.matmul(torch.exp(scores - lse[:, :, None]).transpose(-1, -2), v)  # [B, KVH, G*Q, D]
            for prefix in grp.shared:
                self._merge_shared(q, cache, prefix, out, lse)
            out = out.to(self.dtype)
        else:
            probs = torch.softmax(scores.float(), dim=2).to(kv.dtype)
            out = torch.matmul(probs.transpose(-1, -2), v).to(self.dtype)  # [B, KVH, G*Q, D]
        out = out.view(num_b, kvh, g, max_q, d).permute(0, 3, 1, 2, 4).reshape(num_b * max_q, h * d)
        if grp.valid_rows is not None:
            out = out.index_select(0, grp.valid_rows)
        return out

    @staticmethod
    def _merge_shared(q: torch.Tensor, cache: torch.Tensor, prefix: _SharedPrefix, out: torch.Tensor,
                      lse: torch.Tensor) -> None:
        """Adds a shared prefix to its members' attention in place: one matmul over the prefix's
        keys for all their queries (`q`: [B, KVH, G*Q, D] fp32), merged with what each member's
        own keys gave (`out`, normalised, and its log-sum-exp `lse`)."""
        m = len(prefix.members)
        _, kvh, gq, d = q.shape
        kv = cache.index_select(0, prefix.slots).float()  # [P, 2, KVH, D]
        k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [KVH, P, D]
        qs = q.index_select(0, prefix.members).transpose(0, 1).reshape(kvh, m * gq, d)
        scores = torch.matmul(k, qs.transpose(-1, -2))  # [KVH, P, m*G*Q]: every prefix key is visible
        lse_p = torch.logsumexp(scores, dim=1)  # [KVH, m*G*Q]
        out_p = torch.matmul(torch.exp(scores - lse_p[:, None]).transpose(-1, -2), v)  # [KVH, m*G*Q, D]
        out_p = out_p.view(kvh, m, gq, d).transpose(0, 1)
        lse_p = lse_p.view(kvh, m, gq).transpose(0, 1)
        lse_own = lse.index_select(0, prefix.members)
        total = torch.logaddexp(lse_p, lse_own)
        merged = (out_p * torch.exp(lse_p - total)[..., None]
                  + out.index_select(0, prefix.members) * torch.exp(lse_own - total)[..., None])
        out.index_copy_(0, prefix.members, merged)

    def _long_slice_attention(self, q: torch.Tensor, cache: torch.Tensor, grp: _AttentionGroup) -> torch.Tensor:
        """[Q, H*D] attention of one long slice (a prefill chunk) through PyTorch's fused CPU
        attention, in fp32 whatever the model's dtype (bf16 SDPA is the pathological kernel;
        RESOURCES.md). The padded path materialises [L, G*Q] scores and biases per KV head and
        softmaxes over a strided dim: a 1,800-token prompt took 16 s to prefill on the 2-core
        EPYC, superlinear in its length."""
        kv = torch.index_select(cache, 0, grp.gather_slots, out=self._gather_buffer(len(grp.gather_slots)))
        kv = kv.float()
        k = kv[:, 0].transpose(0, 1)[None]  # [1, KVH, L, D]
        v = kv[:, 1].transpose(0, 1)[None]
        q = q.float().transpose(0, 1)[None]  # [1, H, Q, D]; the softmax scale is in the query weights
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=grp.long_mask, is_causal=grp.causal, scale=1.0,
                                             enable_gqa=True)
        return out[0].transpose(0, 1).reshape(grp.max_q, -1).to(self.dtype)

    def _gather_buffer(self, rows: int) -> torch.Tensor:
        """`rows` KV cache rows of scratch, reused by every layer and step. A fresh tensor for the
        gathered keys goes past glibc's 32 MB mmap ceiling once a step's rows x keys grow (32 decode
        rows at 800 keys: 39 MB), and then every layer maps it anew and faults in every page: on the
        2-core EPYC (fp32) 288k page faults and 1,162 ms per step at 800 keys against 470 ms at 500."""
        if self._gathered.shape[0] < rows:
            self._gathered = torch.empty(int(rows * 1.25), *self.kv_cache[0].shape[1:], dtype=self.dtype)
        return self._gathered[:rows]

    @torch.inference_mode()
    def forward(self, batch: list[SequenceSlice]) -> torch.Tensor:
        """Runs one step; returns float32 logits of each slice's last `num_logits` tokens."""
        return self._forward(batch, ())[0]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of `token_ids` (what a draft head reads beside the hidden states)."""
        return self.embed[token_ids]

    @torch.inference_mode()
    def forward_hidden(self, batch: list[SequenceSlice], layers: tuple[int, ...]) -> StepHidden:
        """`forward`, and for every fed row (batch order) the residual stream entering each of
        `layers` and the final normed hidden state: what a draft head reads (draft/head.py).
        The logits are the same bit for bit: the decode step's fused layer loop is cut at the
        layers named, and the residual stream passes between the pieces unchanged."""
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= len(self.layers):
            raise ValueError(f"hidden layers must be ascending indices below {len(self.layers)}, got {layers}")
        logits, aux, final = self._forward(batch, tuple(layers))
        return StepHidden(logits, aux, final)

    def _forward(self, batch: list[SequenceSlice], layers: tuple[int, ...]):
        inp = self._prepare(batch)
        x = self.embed[inp.token_ids]  # a copy: the residual stream is updated in place
        group = inp.groups[0]
        aux = []
        if self._fused is not None and len(inp.groups) == 1 and group.kv_lens is not None:
            # A decode step: the same layer loop in one call of the row kernel (`decode_layers`),
            # one call per piece between the layers whose input is wanted.
            weights, sizes = self._fused
            per_w, per_s = len(weights) // len(self.layers), len(sizes) // len(self.layers)
            def run(a: int, b: int) -> torch.Tensor:  # layers a..b-1
                return self.kernel.decode_layers(x, weights[a * per_w:b * per_w], sizes[a * per_s:b * per_s],
                                                 self.kv_cache[a:b], inp.cos, inp.sin, inp.slot_mapping,
                                                 group.gather_slots, group.kv_lens, *group.kernel_prefixes,
                                                 self.num_heads, self.eps)

            start = 0
            for layer in layers:
                if layer > start:
                    x = run(start, layer)
                aux.append(x.clone())  # the residual stream entering `layer`
                start = layer
            if start < len(self.layers):
                x = run(start, len(self.layers))
        else:
            delta = None  # each block's output, added to x by the next norm
            for i, layer in enumerate(self.layers):
                h = self._add_norm(x, delta, layer.input_norm)
                if i in layers:
                    aux.append(x.clone())  # the residual stream entering layer i (x holds delta now)
                delta = layer.o(self._attention(i, layer.qkv(h), inp))
                h = self._add_norm(x, delta, layer.post_norm)
                delta = layer.down(self._silu_mul(layer.gate_up(h)))
            x = x + delta
        if not layers:
            x = x.index_select(0, inp.last_rows)
            return self.lm_head(self._add_norm(x, None, self.final_norm)), None, None
        final = self._add_norm(x, None, self.final_norm)
        return self.lm_head(final.index_select(0, inp.last_rows)), torch.cat(aux, -1), final
