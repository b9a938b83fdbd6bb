"""The slow fallback backend: any HF causal LM, behind the model runner's interface.

Its paged "KV cache" holds token ids instead of keys and values: each step it writes the
new tokens into their slots, reads every thread's whole context back through its block
table, and recomputes it with the HF model. Forks, sharing, copies and preemption behave
exactly as with the native runner; only the speed differs.
"""
from __future__ import annotations

import torch

from .model_runner import ThreadSlice


class HFRunner:
    def __init__(self, hf_model, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.model = hf_model.to(dtype)
        self.block_size = block_size
        self.vocab_size = hf_model.get_input_embeddings().weight.shape[0]
        self.weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
        self.slot_tokens = torch.zeros(num_blocks * block_size, dtype=torch.long)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return torch.tensor(block_table, dtype=torch.long)[pos // self.block_size] * self.block_size + pos % self.block_size

    def copy_block(self, src: int, dst: int, num_slots: int) -> None:
        s, d = src * self.block_size, dst * self.block_size
        self.slot_tokens[d : d + num_slots] = self.slot_tokens[s : s + num_slots]

    @torch.inference_mode()
    def forward(self, batch: list[ThreadSlice]) -> torch.Tensor:
        contexts = []
        for s in batch:
            end = s.start_pos + len(s.token_ids)
            self.slot_tokens[self._slots(s.block_table, s.start_pos, end)] = torch.tensor(s.token_ids)
            contexts.append(self.slot_tokens[self._slots(s.block_table, 0, end)])
        longest = max(len(c) for c in contexts)
        ids = torch.zeros(len(contexts), longest, dtype=torch.long)
        mask = torch.zeros(len(contexts), longest, dtype=torch.long)
        for i, context in enumerate(contexts):  # left padding: every last token is at -1
            ids[i, longest - len(context) :] = context
            mask[i, longest - len(context) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
