"""The slow fallback `Runner`: any HF causal LM.

Its paged "KV cache" holds token ids instead of keys and values: each step it writes the
new tokens into their slots, reads every thread's whole context back through its block
table, and recomputes it with the HF model. Forks, sharing, copies and preemption behave
exactly as with the native runner; only the speed differs.
"""
from __future__ import annotations

import torch

from .runner import BlockCopy, RunnerInfo, SequenceSlice


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
            # Its slots hold token ids, and a joined span's tokens would need their own tree mask
            # recomputed: joins run on the torch and llama.cpp runners.
            joins=False,
        )
        self.slot_tokens = torch.zeros(engine_config.num_kv_blocks * engine_config.block_size, dtype=torch.long)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return torch.tensor(block_table, dtype=torch.long)[pos // self.block_size] * self.block_size + pos % self.block_size

    def fork(self, parent: int, child: int, copy: BlockCopy | None) -> None:
        if copy is not None:
            s, d = copy.src * self.block_size, copy.dst * self.block_size
            self.slot_tokens[d : d + copy.num_slots] = self.slot_tokens[s : s + copy.num_slots]

    def release(self, seq_id: int) -> None:
        """Nothing to do: slots belong to blocks, which the engine's block manager frees."""

    def truncate(self, seq_id: int, position: int) -> None:
        """Nothing to do: slots past the end are overwritten when those positions are fed again."""

    def join(self, seq_id: int, sources) -> None:
        raise NotImplementedError("the hf backend does not join (RunnerInfo.joins is False)")

    @torch.inference_mode()
    def forward(self, batch: list[SequenceSlice]) -> torch.Tensor:
        contexts = []
        for s in batch:
            end = s.start + len(s.token_ids)
            self.slot_tokens[self._slots(s.block_table, s.start, end)] = torch.tensor(s.token_ids)
            contexts.append(self.slot_tokens[self._slots(s.block_table, 0, end)])
        longest = max(len(c) for c in contexts)
        ids = torch.zeros(len(contexts), longest, dtype=torch.long)
        mask = torch.zeros(len(contexts), longest, dtype=torch.long)
        for i, context in enumerate(contexts):  # left padding: every last token is at -1
            ids[i, longest - len(context) :] = context
            mask[i, longest - len(context) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return torch.cat([logits[i, longest - s.num_logits :] for i, s in enumerate(batch)]).float()
