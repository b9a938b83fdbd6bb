"""The runner's hidden states for a draft head (`TorchRunner.forward_hidden`): the same logits
as `forward`, and per fed row the residual stream entering the layers asked for, against HF's
`output_hidden_states` (an independent implementation: hidden_states[i] enters layer i)."""
from __future__ import annotations

import pytest
import torch

from parafork import models
from parafork.engine.runner import SequenceSlice
from parafork.llm import LLM


def _hf_hidden(llm: LLM, ids: list[int]):
    hf = models.load_hf_model(models.resolve_model_path(llm.config.model), llm.tokenizer, llm.config.torch_dtype,
                              adapter=llm.adapter)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    final = out.hidden_states[-1][0]  # HF's last entry is after the final norm
    return out.hidden_states, final, out.logits[0].float()


@pytest.mark.parametrize("layers", [(0,), (1,), (0, 1)])
def test_hidden_states_of_a_prefill_and_a_decode_step_match_hf(tiny_dir, layers):
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=32, block_size=4, step_cost="fixed")
    runner = llm.engine.runner
    ids = list(range(300, 321))
    table = list(range(6))
    # The prompt as one prefill slice, then one decode step of the last token.
    first = runner.forward_hidden([SequenceSlice(0, ids[:-1], 0, table)], layers)
    plain = runner.forward([SequenceSlice(0, ids[-1:], len(ids) - 1, table)])
    step = runner.forward_hidden([SequenceSlice(0, ids[-1:], len(ids) - 1, table)], layers)
    assert torch.equal(step.logits, plain)  # the same step, with or without hidden states
    hidden, final, logits = _hf_hidden(llm, ids)
    aux = torch.cat([first.aux, step.aux])
    h = hidden[0].shape[-1]
    assert aux.shape == (len(ids), h * len(layers)) and torch.cat([first.final, step.final]).shape == (len(ids), h)
    for k, layer in enumerate(layers):
        torch.testing.assert_close(aux[:, k * h:(k + 1) * h], hidden[layer][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([first.final, step.final]), final, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step.logits[0], logits[-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ascending"):
        runner.forward_hidden([SequenceSlice(0, ids[-1:], len(ids) - 1, table)], (1, 0))
    with pytest.raises(ValueError, match="ascending"):
        runner.forward_hidden([SequenceSlice(0, ids[-1:], len(ids) - 1, table)], (2,))


@pytest.mark.model
def test_the_row_kernels_decode_step_cut_at_three_layers_gives_the_same_logits_bit_for_bit():
    bundled_llm = LLM("bundled", dtype="bfloat16", num_kv_blocks=64)  # the row kernel computes bf16
    runner = bundled_llm.engine.runner
    if runner.kernel is None:
        pytest.skip(f"the row kernel is not built here: {runner.linear_path}")
    ids = bundled_llm.encode("Name three rivers.")
    blocks = (len(ids) + 2) // bundled_llm.config.block_size + 1
    tables = [list(range(k * blocks, (k + 1) * blocks)) for k in range(3)]
    for table in tables:
        runner.forward([SequenceSlice(0, ids, 0, table)])
    batch = [SequenceSlice(k, [ids[-1] + k], len(ids), table) for k, table in enumerate(tables)]
    plain = runner.forward(batch)
    step = runner.forward_hidden(batch, (2, 15, 27))
    assert torch.equal(step.logits, plain)
    assert step.aux.shape == (3, 3 * 576) and step.final.shape == (3, 576)
    first = runner.forward_hidden(batch, (0, 29))  # the embeddings themselves, and the last layer's input
    assert torch.equal(first.logits, plain) and first.aux.shape == (3, 2 * 576)
    assert torch.equal(first.aux[:, :576], runner.embed[torch.tensor([s.token_ids[0] for s in batch])])
    # Against HF in bf16: the decode row of sequence 0 is the prompt's last position, one token on.
    hidden, final, _ = _hf_hidden(bundled_llm, [*ids, ids[-1]])
    for k, layer in enumerate((2, 15, 27)):
        ours, theirs = step.aux[0, k * 576:(k + 1) * 576].float(), hidden[layer][0, -1].float()
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.999
