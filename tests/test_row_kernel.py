"""parafork's row kernel (runners/row_kernel.py): each op against an independent fp32 reference,
the torch runner with it against HF in bf16 and against the oneDNN path it replaces, and the
fallback where it cannot be had. Skipped, with the reason, on CPUs without AVX-512 BF16."""
import pytest
import torch

from parafork import models
from parafork.config import EngineConfig
from parafork.runners import row_kernel
from parafork.engine.runner import BlockCopy, SequenceSlice
from parafork.runners.torch_runner import TorchRunner, _Linear

kernel = row_kernel.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason=f"row kernel unavailable: {row_kernel.unavailable()}")


def _bf16_close(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0) -> None:
    # bf16 keeps 8 bits of mantissa: outputs are rounded once (relative 2^-8) on top of fp32 sums.
    torch.testing.assert_close(got.float(), want, atol=scale * 2e-2, rtol=1e-2)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16, 40])
def test_linear_equals_fp32_for_any_row_count_and_unpadded_widths(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(100, 96, generator=g)  # 100 outputs: not a multiple of 16, so the packing pads
    b = torch.randn(100, generator=g)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    want = x.float() @ w.bfloat16().float().T + b.bfloat16().float()
    lin = _Linear(w, b, torch.bfloat16, kernel)
    assert lin.kernel is not None and not lin.packed
    _bf16_close(lin(x), want, scale=10)
    logits = _Linear(w, None, torch.bfloat16, kernel, fp32_out=True)(x)
    assert logits.dtype == torch.float32  # the lm_head keeps fp32 sums: no rounding of the logits
    torch.testing.assert_close(logits, x.float() @ w.bfloat16().float().T, atol=1e-3, rtol=1e-4)


@needs_kernel
def test_add_rms_norm_adds_in_place_and_rounds_as_hf_does():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(7, 64, generator=g).bfloat16(), torch.randn(7, 64, generator=g).bfloat16()
    w = torch.randn(64, generator=g).bfloat16()
    summed = x + d  # the residual add in bf16, as HF does it
    var = summed.float().pow(2).mean(-1, keepdim=True)
    want = w * (summed.float() * torch.rsqrt(var + 1e-5)).bfloat16()  # HF's LlamaRMSNorm
    got = kernel.add_rms_norm(x, d, w, 1e-5)
    assert torch.equal(x, summed)  # in place
    torch.testing.assert_close(got, want, atol=0, rtol=1e-2)
    torch.testing.assert_close(kernel.add_rms_norm(x, torch.empty(0, dtype=torch.bfloat16), w, 1e-5), want,
                               atol=0, rtol=1e-2)
    assert torch.equal(x, summed)  # no delta: x untouched


NO_PREFIX = (torch.empty(0, 0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))


def _attention_reference(q, cache, keys_of):
    """fp32 softmax attention of each sequence's one query over the slots `keys_of(b)`."""
    heads, group = q.shape[1], q.shape[1] // cache.shape[2]
    out = torch.empty(q.shape[0], heads, q.shape[2])
    for b in range(q.shape[0]):
        kv = cache[keys_of(b)].float()
        for h in range(heads):
            p = torch.softmax(kv[:, 0, h // group] @ q[b, h].float(), 0)
            out[b, h] = p @ kv[:, 1, h // group]
    return out


@needs_kernel
@pytest.mark.parametrize("head_dim", [32, 64])
def test_decode_attention_equals_softmax_attention_over_each_sequences_slots(head_dim):
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(500, 2, 3, head_dim, generator=g).bfloat16()  # [slots, K/V, KV heads, head dim]
    q = torch.randn(4, 6, head_dim, generator=g).bfloat16()  # 6 query heads over 3 KV heads
    lens = torch.tensor([150, 17, 1, 64])  # across chunks of 64 keys, one key, exactly one chunk
    slots = torch.randint(0, 499, (4, 150), generator=g)
    out = kernel.decode_attention(q, cache, slots, lens, *NO_PREFIX).float().view(4, 6, head_dim)
    _bf16_close(out, _attention_reference(q, cache, lambda b: slots[b, : lens[b]]))


@needs_kernel
def test_decode_attention_reads_a_shared_prefix_once_for_its_members_and_merges_it_with_their_own_keys():
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(600, 2, 3, 64, generator=g).bfloat16()
    q = torch.randn(5, 9, 64, generator=g).bfloat16()
    prefix_slots = torch.randint(0, 599, (2, 130), generator=g)
    prefix_lens = torch.tensor([130, 16])
    prefix_of = torch.tensor([0, 1, 0, -1, 0])  # three siblings on prefix 0, one on prefix 1, one on none
    lens = torch.tensor([3, 40, 1, 70, 65])
    slots = torch.randint(0, 599, (5, 70), generator=g)
    out = kernel.decode_attention(q, cache, slots, lens, prefix_slots, prefix_lens, prefix_of).float().view(5, 9, 64)

    def keys_of(b):
        own = slots[b, : lens[b]]
        p = int(prefix_of[b])
        return own if p < 0 else torch.cat([prefix_slots[p, : prefix_lens[p]], own])

    _bf16_close(out, _attention_reference(q, cache, keys_of))


@needs_kernel
def test_the_runner_with_the_kernel_matches_hf_and_the_onednn_path_with_forks_and_a_stranger(tiny_dir, tiny_llm):
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.bfloat16)
    prompt, other = list(range(300, 370)), list(range(800, 830))

    def run(use_kernel: bool):
        runner = TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="bfloat16", row_kernel=use_kernel))
        assert (runner.kernel is not None) == use_kernel and runner.info.kernels == (
            "row kernel on" if use_kernel else "row kernel off (row_kernel=False)")
        first = runner.forward([SequenceSlice(0, prompt, 0, list(range(18)))])  # a prefill: 16 rows at a time
        runner.forward([SequenceSlice(9, other, 0, list(range(40, 48)))])
        tables = {0: list(range(18))}
        for child, tail in ((1, 20), (2, 21)):
            runner.fork(0, child, BlockCopy(17, tail, 2))
            tables[child] = list(range(17)) + [tail, tail + 10]
        decode = [SequenceSlice(0, [5], 70, tables[0] + [30]), SequenceSlice(1, [6], 70, tables[1]),
                  SequenceSlice(9, [7], 30, list(range(40, 48))), SequenceSlice(2, [8], 70, tables[2])]
        assert (runner._prepare(decode).groups[0].kv_lens is not None) == use_kernel  # the kernel's attention ran
        drafts = [SequenceSlice(1, [9, 10, 11], 71, tables[1], num_logits=3)]  # several queries: one row each
        assert (runner._prepare(drafts).groups[0].kv_lens is not None) == use_kernel
        # Two siblings feeding two tokens each: rows of several slices over their shared prefix.
        pairs = [SequenceSlice(1, [14, 15], 74, tables[1], num_logits=2), SequenceSlice(2, [16, 17], 71, tables[2], num_logits=2)]
        if use_kernel:
            assert runner._prepare(pairs).groups[0].kernel_prefixes[2].tolist() == [0, 0, 0, 0]  # every row on prefix 0
        return first, runner.forward(decode), runner.forward(drafts), runner.forward(pairs)

    with_kernel, without = run(True), run(False)
    with torch.no_grad():
        refs = [hf(torch.tensor([ids])).logits[0, -n:].float() for ids, n in
                [(prompt, 1), (prompt + [5], 1), (prompt + [6], 1), (other + [7], 1), (prompt + [8], 1),
                 (prompt + [6, 9, 10, 11], 3), (prompt + [6, 9, 10, 11, 14, 15], 2), (prompt + [8, 16, 17], 2)]]
    got = torch.cat([torch.cat(with_kernel)])
    base = torch.cat([torch.cat(without)])
    want = torch.cat(refs)
    # bf16 end to end: both paths sit as close to HF's bf16 logits as each other.
    err_kernel, err_onednn = (got - want).abs().max().item(), (base - want).abs().max().item()
    assert err_kernel < 0.1 and err_kernel <= 2 * err_onednn + 0.02, (err_kernel, err_onednn)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_without_the_kernel_the_runner_uses_onednn_and_says_why(tiny_dir, tiny_llm, monkeypatch):
    monkeypatch.setattr(row_kernel, "_load", lambda: (None, "this CPU lacks avx512_bf16 (test)"))
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    runner = TorchRunner(hf, EngineConfig(num_kv_blocks=16, block_size=4, dtype="bfloat16"))
    assert runner.kernel is None and runner.layers[0].qkv.kernel is None
    assert runner.info.kernels == "row kernel off: this CPU lacks avx512_bf16 (test)"
    assert runner.forward([SequenceSlice(0, [1, 2, 3], 0, [0])]).shape == (1, runner.info.vocab_size)
    fp32 = TorchRunner(hf, EngineConfig(num_kv_blocks=16, block_size=4, dtype="float32"))
    assert fp32.kernel is None and fp32.info.kernels == "row kernel not used (float32)"


@needs_kernel
def test_rope_cache_rotates_q_and_k_and_writes_kv_where_the_slots_say_and_silu_mul_is_the_mlps():
    g = torch.Generator().manual_seed(2)
    t, h, kvh, d = 5, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g).bfloat16()
    angles = torch.rand(t, d // 2, generator=g) * 3
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16()
    sin = torch.cat([-angles.sin(), angles.sin()], -1).bfloat16()  # the runner's signed table
    cache = torch.zeros(20, 2, kvh, d, dtype=torch.bfloat16)
    slots = torch.tensor([3, 7, 0, 19, 12])
    q = kernel.rope_cache(qkv, cos[:, None], sin[:, None], cache, slots, h)
    x = qkv.float().view(t, h + 2 * kvh, d)
    rot = x[:, : h + kvh] * cos.float()[:, None] + x[:, : h + kvh].roll(d // 2, -1) * sin.float()[:, None]
    _bf16_close(q, rot[:, :h])
    _bf16_close(cache[slots, 0], rot[:, h:])
    assert torch.equal(cache[slots, 1], qkv.view(t, h + 2 * kvh, d)[:, h + kvh:])
    assert cache[[1, 2, 4]].abs().sum() == 0  # nothing written elsewhere
    gate_up = torch.randn(3, 2 * 24, generator=g).bfloat16()
    gate, up = gate_up.chunk(2, -1)
    _bf16_close(kernel.silu_mul(gate_up), (torch.nn.functional.silu(gate) * up).float())


@needs_kernel
def test_the_fused_decode_loop_gives_the_python_loops_logits_and_hidden_states_bit_for_bit(tiny_dir, tiny_llm):
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.bfloat16)
    runner = TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="bfloat16"))
    assert runner._fused is not None
    prompt = list(range(300, 340))
    runner.forward([SequenceSlice(0, prompt, 0, list(range(10)))])
    runner.fork(0, 1, BlockCopy(9, 20, 0))
    decode = [SequenceSlice(0, [5], 40, list(range(11))), SequenceSlice(1, [6], 40, list(range(10)) + [21])]
    calls = []
    fused_loop = runner.kernel.decode_layers

    class Spy:  # counts the fused calls; everything else is the kernel itself
        def __getattr__(self, name):
            return getattr(row_kernel.load(), name)

        def decode_layers(self, *args):
            calls.append(1)
            return fused_loop(*args)

    runner.kernel = Spy()
    fused = runner.forward(decode)  # the same slots are written again with the same K/V each time
    assert calls == [1]
    # The draft head's features too (the stream entering the first and the last layer: the fused
    # loop cut there), against the Python loop's.
    layers = (0, len(runner.layers) - 1)
    fused_hidden = runner.forward_hidden(decode, layers)
    runner._fused = None
    looped = runner.forward(decode)
    looped_hidden = runner.forward_hidden(decode, layers)
    assert torch.equal(fused, looped)
    for got, want in ((fused_hidden.logits, looped_hidden.logits), (fused_hidden.aux, looped_hidden.aux),
                      (fused_hidden.final, looped_hidden.final)):
        assert torch.equal(got, want)
    assert torch.equal(fused_hidden.logits, fused)


@needs_kernel
def test_kernel_rows_of_multi_token_slices_see_exactly_their_causal_keys(tiny_dir, tiny_llm):
    """Each query row of a slice attends to its sequence's entries up to itself, no further: the
    shared prefix (once for all sharers) plus its own remaining keys, for siblings of 2-3 tokens."""
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.bfloat16)
    runner = TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="bfloat16"))
    tables = {1: list(range(10)) + [20, 21], 2: list(range(10)) + [30, 31]}  # 40 shared entries
    batch = [SequenceSlice(1, [5, 6, 7], 41, tables[1], num_logits=3), SequenceSlice(2, [8, 9], 42, tables[2], num_logits=2)]
    group = runner._prepare(batch).groups[0]
    prefix_slots, prefix_lens, prefix_of = group.kernel_prefixes
    assert prefix_of.tolist() == [0] * 5 and prefix_lens.tolist() == [40]
    rows = [(s, i) for s in batch for i in range(len(s.token_ids))]
    for r, (s, i) in enumerate(rows):
        want = {s.block_table[k // 4] * 4 + k % 4 for k in range(s.start + i + 1)}
        got = prefix_slots[0, :40].tolist() + group.gather_slots[r, : group.kv_lens[r]].tolist()
        assert sorted(got) == sorted(want), (r, i)
