"""Int8 weights (runners/kernels/int8.h): the kernel against an integer oracle, its AVX2 path
against its AVX-512 VNNI path bit for bit, and the runner and engine on int8 weights."""
import pytest
import torch

from parafork import models
from parafork.config import EngineConfig
from parafork.engine.runner import BlockCopy, SequenceSlice
from parafork.runners import row_kernel
from parafork.runners.torch_runner import TorchRunner
from parafork.sampling import SamplingParams

needs_vnni = pytest.mark.skipif(row_kernel.load() is None, reason=f"row kernel: {row_kernel.unavailable()}")


def _avx2():
    return row_kernel.load_int8(force_avx2=True)


def unpack(blob: torch.Tensor, M: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pack_int8 blob's int8 weights [M, K] and per-channel scales [M], from its documented layout."""
    MB, KB = blob.shape[0], K // 32
    tiles = blob[:, : KB * 512].reshape(MB, KB, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(MB * 16, K)
    q = tiles.to(torch.int16) - 128
    scales = blob[:, KB * 512:].contiguous().view(torch.float32).reshape(-1)
    return q[:M], scales[:M]


def oracle(x: torch.Tensor, blob: torch.Tensor, M: int) -> torch.Tensor:
    """y = s_w * sum_b s_x[b] * (q_x[b] . q_w[b]): activations quantized per 32 as the kernel
    says it does (fp32 127 / max|x|, round half to even), block sums in exact integers, the rest in fp64."""
    N, K = x.shape
    q_w, s_w = unpack(blob, M, K)
    xb = x.float().reshape(N, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q_x = torch.round(xb * inv).clamp(-127, 127).to(torch.int64)
    s_x = (amax / 127).double()
    sums = torch.einsum("nbk,mbk->nmb", q_x, q_w.to(torch.int64).reshape(M, K // 32, 32))  # exact
    return (sums.double() * s_x.reshape(N, 1, -1)).sum(-1) * s_w.double()


@pytest.mark.parametrize("rows", [1, 2, 5, 9, 16, 17, 40])
def test_int8_kernel_equals_the_integer_oracle_and_its_avx2_path_bit_for_bit(rows):
    torch.manual_seed(rows)
    M, K = 72, 96  # M not a multiple of 16: padded channels are cut off
    w = torch.randn(M, K)
    w[3] *= 20  # a loud output channel: its own scale
    x = torch.randn(rows, K).to(torch.bfloat16)
    x[:, 33] *= 50  # an outlier activation channel, as this model has: it only coarsens its own block
    x[0, 64:96] = 0  # an all-zero block (scale 0) must give 0, not NaN
    avx2 = _avx2()
    blob = avx2.pack_int8(w)
    assert blob.dtype == torch.uint8 and blob.shape == (5, 3 * 512 + 64)  # 1.0078 bytes a weight here
    q_w, s_w = unpack(blob, M, K)
    assert q_w.abs().max() == 127
    assert torch.all((q_w.float() * s_w[:, None] - w).abs() <= s_w[:, None] / 2 + 1e-6)  # rounded to nearest
    want = oracle(x, blob, M)
    got = avx2.mm(x, blob, M, True)
    assert got.shape == (rows, M) and got.dtype == torch.float32
    # Exact integer block sums; fp32 only in the scale-and-accumulate across 3 blocks.
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(avx2.mm(x, blob, M, False), got.to(torch.bfloat16))
    if row_kernel.load() is not None:
        vnni = row_kernel.load_int8()
        assert vnni.int8_path == "avx512-vnni" and torch.equal(vnni.pack_int8(w), blob)
        assert torch.equal(vnni.mm(x, blob, M, True), got)  # the same int32 sums, the same fp32 order
        assert torch.equal(vnni.mm(x, blob, M, False), got.to(torch.bfloat16))
    # Against the unquantized product: int8 x int8 with blocks of 32 is within ~1-2% here.
    exact = x.float() @ w.T
    assert (got - exact).norm() / exact.norm() < 0.03


def test_int8_kernel_refuses_what_it_cannot_pack():
    avx2 = _avx2()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        avx2.pack_int8(torch.randn(16, 40))
    blob = avx2.pack_int8(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="not packed for K=32"):
        avx2.mm(torch.randn(1, 32), blob, 16, True)


def _runner(tiny_dir, tiny_llm, quant):
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.bfloat16)
    return TorchRunner(hf, EngineConfig(num_kv_blocks=64, block_size=4, dtype="bfloat16", quant=quant))


def _steps(runner):
    prompt = list(range(300, 340))
    out = [runner.forward([SequenceSlice(0, prompt, 0, list(range(10)))])]
    runner.fork(0, 1, BlockCopy(9, 20, 0))
    out.append(runner.forward([SequenceSlice(0, [5], 40, list(range(11))),
                               SequenceSlice(1, [6], 40, list(range(10)) + [21])]))
    return out


@needs_vnni
def test_int8_runner_fused_on_vnni_equals_the_avx2_layer_loop_and_stays_near_bf16(tiny_dir, tiny_llm, monkeypatch):
    vnni = _runner(tiny_dir, tiny_llm, "int8")
    assert vnni._fused is not None and "int8 (avx512-vnni)" in vnni.info.kernels
    bf16 = _runner(tiny_dir, tiny_llm, None)
    assert vnni.info.weight_bytes < 0.54 * bf16.info.weight_bytes  # the scales: 4 bytes a channel
    monkeypatch.setenv("PARAFORK_INT8_PATH", "avx2")
    avx2 = _runner(tiny_dir, tiny_llm, "int8")
    assert avx2._fused is None and "int8 (avx2)" in avx2.info.kernels
    for a, b, c in zip(_steps(vnni), _steps(avx2), _steps(bf16)):
        assert torch.equal(a, b)  # the prefill chunk and the fused decode step, bit for bit
        assert (a - c).norm() / c.norm() < 0.05


def test_int8_engine_answers_forks_and_gives_every_block_back(tiny_dir, monkeypatch):
    from parafork.llm import LLM
    from parafork.rules import ForceForks

    monkeypatch.setenv("PARAFORK_INT8_PATH", "avx2")  # the path every x86 machine with AVX2 has
    llm = LLM(str(tiny_dir), quant="int8", num_kv_blocks=128, block_size=4, step_cost="fixed")
    force = ForceForks(llm.control, frozenset({3, 9}), child_tokens=6, root_tokens=14)
    out = llm.generate(["Give me three tips for sleeping well."], SamplingParams(max_tokens=60, logits_rules=[force], no_repeat_heads=False, plan_budget=False))[0]
    assert out.finished and out.num_threads == 3 and len(out.token_ids) > 10
    llm.check_idle()


def test_quant_names_weights_on_every_backend():
    assert EngineConfig(quant="int8", backend="llamacpp").quant == "q8_0"  # llama.cpp's own int8
    assert EngineConfig(quant="int8").quant == "int8"
    with pytest.raises(ValueError, match="GGUF type"):
        EngineConfig(quant="q8_0", backend="torch")
    with pytest.raises(ValueError, match="not on 'hf'"):
        EngineConfig(quant="int8", backend="hf")
    with pytest.raises(ValueError, match="quant must be one of"):
        EngineConfig(quant="int4")
