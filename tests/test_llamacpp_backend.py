"""The llama.cpp backend (threads as llama.cpp sequences in one unified KV cache) against
llama.cpp on its own: the same GGUF, token for token; forks against separate runs; every
sequence and KV cell free after any request ends."""
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parafork import models
from parafork.runners.llamacpp_api import load
from parafork.runners.llamacpp_runner import MAX_SEQUENCES, LlamaCppRunner, reference_greedy
from parafork.engine.runner import SequenceSlice
from parafork.engine.step_cost import StepCost
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams
from parafork.tokens import CHILD, FORK

from .conftest import PROMPTS
from .test_runner import run_four_forking_requests


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir, tmp_path_factory):
    """The tiny random model (with [Fork]/[Child]) converted by llama.cpp's own converter."""
    from parafork.export import export_gguf

    return export_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", None, "f16")


def tiny_llamacpp(tiny_dir, **config):
    """The tiny model on llama.cpp: exported once into the cache (tokenizer from its HF folder)."""
    return LLM(str(tiny_dir), backend="llamacpp", **{"cpu_threads": 1, "num_kv_blocks": 256, "block_size": 4, **config})


def test_ar_on_the_backend_equals_llamacpps_own_greedy_loop(base_dir):
    llm = LLM("base", backend="llamacpp", cpu_threads=1, num_kv_blocks=64)
    gguf = models.base_gguf_path()  # "base" without quant: the shipped Q4_1 file itself
    for prompt in PROMPTS[:2]:
        ids = llm.encode(prompt)
        own, _ = reference_greedy(gguf, ids, 48, threads=1, stop_ids=llm.control.eos_ids)
        out = llm.generate(prompt, SamplingParams(max_tokens=48, mode="ar"))[0]
        assert out.token_ids == [t for t in own if t not in llm.control.eos_ids]
    with pytest.raises(ValueError, match=r"no \[Fork\]/\[Child\] tokens"):
        llm.generate("hi", SamplingParams(mode="apar"))
    llm.check_idle()


def test_a_forked_sequence_sees_exactly_its_parents_context(tiny_gguf, tiny_llm):
    from parafork.config import EngineConfig

    runner = LlamaCppRunner(tiny_gguf, EngineConfig(num_kv_blocks=64, block_size=4, cpu_threads=1), len(tiny_llm.tokenizer))
    prompt = list(range(300, 320))
    runner.forward([SequenceSlice(0, prompt, 0, [])])
    runner.fork(0, 1, None)  # the child shares all 20 cells of the parent
    fork, child = tiny_llm.control.fork_id, tiny_llm.control.child_id
    both = runner.forward([SequenceSlice(0, [fork, 7, 8], 20, []), SequenceSlice(1, [fork, child, 9], 20, [])])
    # Separate single-sequence runs over each one's whole context, in sequences nobody else used.
    alone_parent = runner.forward([SequenceSlice(10, prompt + [fork, 7, 8], 0, [])])[0]
    alone_child = runner.forward([SequenceSlice(11, prompt + [fork, child, 9], 0, [])])[0]
    n = runner.n_vocab
    np.testing.assert_allclose(both[0, :n].numpy(), alone_parent[:n].numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(both[1, :n].numpy(), alone_child[:n].numpy(), atol=1e-3, rtol=0)
    assert runner.cells_in_use(1) == (0, 22) and runner.cells_in_use(0) == (0, 22)
    for s in (0, 1, 10, 11):
        runner.release(s)
        assert runner.cells_in_use(s) == (-1, -1)


def test_concurrent_forked_requests_equal_each_run_alone(tiny_dir):
    llm = tiny_llamacpp(tiny_dir)
    force = ForceForks(llm.control, frozenset({2, 6}), child_tokens=10, root_tokens=14)
    params = SamplingParams(max_tokens=200, logits_rules=[force], plan_budget=False, no_repeat_heads=False)
    prompts = [{"prompt_token_ids": list(range(400 + 5 * i, 420 + 5 * i))} for i in range(3)]
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        assert out.num_threads == 3 and out.finish_reason == "stop"
        assert llm.generate(prompt, params)[0].token_ids == out.token_ids
    llm.check_idle()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.integers(14, 40), forks=st.sets(st.integers(1, 10), max_size=4), abort_after=st.integers(0, 12),
       spec=st.sampled_from(["off", "ngram"]), defer=st.sampled_from([None, 0]))
def test_after_finish_abort_and_preemption_every_sequence_and_cell_is_free(tiny_dir, blocks, forks, abort_after, spec,
                                                                          defer):
    llm = tiny_llamacpp(tiny_dir, num_kv_blocks=blocks, admission_reserve=0,  # preemptions likely
                        defer_forks_from_rows=defer)  # 0: every child waits a step for its parent's cells
    if spec == "ngram":
        llm.engine.step_cost = StepCost.linear(0.0)  # every proposed draft is fed

    def check(steps: int, with_ids: set[int]) -> None:
        assert llm.engine.runner.live == with_ids

    run_four_forking_requests(llm, forks, abort_after, check, speculative=spec)
    llm.check_idle()
    assert not llm.engine.runner.live
    assert all(llm.engine.runner.cells_in_use(s) == (-1, -1) for s in range(MAX_SEQUENCES))


def test_drafts_on_llamacpp_give_the_same_tokens_and_leave_no_rejected_cell(tiny_dir, base_dir):
    # The shipped Q4_1 GGUF, AR: drafts verified by llama.cpp equal llama.cpp's own greedy loop.
    base = LLM("base", backend="llamacpp", cpu_threads=1, num_kv_blocks=64)
    # On this backend drafted rows are dear (its fixed draft_row_cost is 0.7) and the allocator rarely drafts;
    # here rows cost nothing, so every proposed draft is fed and llama.cpp verifies it.
    base.engine.step_cost = StepCost.linear(0.0)
    accepted = 0
    for prompt in PROMPTS[:2]:
        own, _ = reference_greedy(models.base_gguf_path(), base.encode(prompt), 64, threads=1, stop_ids=base.control.eos_ids)
        out = base.generate(prompt, SamplingParams(max_tokens=64, mode="ar", speculative="ngram"))[0]
        assert out.token_ids == [t for t in own if t not in base.control.eos_ids]
        accepted += out.num_accepted_tokens
    assert accepted > 0
    # The tiny model with forks: the same tree as without drafts; after every step a sequence
    # holds cells up to its last cached token and no further (rejected positions removed).
    llm = tiny_llamacpp(tiny_dir)
    llm.engine.step_cost = StepCost.linear(0.0)
    force = ForceForks(llm.control, frozenset({2, 6}), child_tokens=20, root_tokens=24)
    params = SamplingParams(max_tokens=300, logits_rules=[force], plan_budget=False, no_repeat_heads=False)
    prompts = [{"prompt_token_ids": list(range(400 + 5 * i, 420 + 5 * i))} for i in range(3)]
    plain = llm.generate(prompts, params)
    ids = [llm.add_request(p, replace(params, speculative="ngram"), stream=False) for p in prompts]
    outs = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                outs[out.request_id] = out
        for request in llm.engine.requests.values():
            for t in request.threads:
                if t.seq_id is not None and t.num_cached:
                    assert llm.engine.runner.cells_in_use(t.seq_id)[1] == t.num_cached - 1
    assert [outs[i].token_ids for i in ids] == [o.token_ids for o in plain]
    assert sum(outs[i].num_accepted_tokens for i in ids) > 0
    assert sum(outs[i].num_draft_tokens - outs[i].num_accepted_tokens for i in ids) > 0  # rejections happened
    llm.check_idle()
    assert all(llm.engine.runner.cells_in_use(s) == (-1, -1) for s in range(MAX_SEQUENCES))


def test_a_gguf_file_is_loaded_as_it_is(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match="re-quantizing"):
        LLM(str(tiny_gguf), backend="llamacpp", quant="q8_0")
    with pytest.raises(ValueError, match="adapter cannot be merged"):
        LLM(str(tiny_gguf), adapter=str(tmp_path))
    with pytest.raises(ValueError, match="runs on backend='llamacpp' \\(as it is\\) or 'torch'"):
        LLM(str(tiny_gguf), backend="hf")


def test_a_q8_0_gguf_runs_on_the_torch_engine_as_its_own_weights(tiny_dir, tiny_llm, tmp_path):
    """A user's Q8_0 file on the torch backend: its blocks de-quantized exactly (each weight its
    block's scale times its int8), then, with quant="int8", packed again per output channel."""
    import gguf as gguf_lib
    import torch
    from safetensors.torch import load_file

    from parafork.export import export_gguf

    q8 = export_gguf(tiny_dir, tmp_path / "tiny-q8_0.gguf", None, "q8_0")
    folder = models.gguf_as_hf(q8)
    weights = load_file(folder / "model.safetensors")
    reader = gguf_lib.GGUFReader(q8)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type == gguf_lib.GGMLQuantizationType.Q8_0
    want = torch.from_numpy(gguf_lib.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(64, 128)
    assert torch.equal(weights["model.layers.0.mlp.down_proj.weight"], want)
    assert models.gguf_as_hf(q8) == folder  # once
    prompt = tiny_llm.encode(PROMPTS[0])
    for quant in (None, "int8"):
        llm = LLM(str(q8), backend="torch", quant=quant, num_kv_blocks=128, block_size=4)
        assert llm.engine.runner.info.gguf is None  # parafork's own runner, not llama.cpp
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=8, mode="ar"))[0]
        assert out.finished and len(out.token_ids) == 8
        llm.check_idle()


def test_the_exported_gguf_keeps_the_control_tokens(tiny_gguf, tiny_llm):
    tokenizer, control = models.load_tokenizer(tiny_gguf)
    assert (control.fork_id, control.child_id) == (tiny_llm.control.fork_id, tiny_llm.control.child_id)
    ffi, lib = load()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(tiny_gguf).encode(), params)
    try:
        vocab = lib.llama_model_get_vocab(model)
        assert ffi.string(lib.llama_vocab_get_text(vocab, control.fork_id)).decode() == FORK
        assert ffi.string(lib.llama_vocab_get_text(vocab, control.child_id)).decode() == CHILD
        text = f"a{FORK}b{CHILD}".encode()
        out = ffi.new("llama_token[]", 32)
        n = lib.llama_tokenize(vocab, text, len(text), out, 32, False, False)
        assert control.fork_id in list(out[0:n]) and control.child_id in list(out[0:n])
    finally:
        lib.llama_model_free(model)


def test_latency_bench_and_generate_run_on_the_llamacpp_backend(tiny_dir, tmp_path, capsys):
    import json
    from types import SimpleNamespace

    from parafork.bench import latency
    from parafork.cli import main

    args = SimpleNamespace(
        model=str(tiny_dir), base_model=str(tiny_dir), adapter=None, dtype="float32", cpu_threads=1, suite="starter",
        backend="llamacpp", quant="q8_0", limit=2, per_category=None, max_tokens=10, json=str(tmp_path / "lat.json"),
        plot=None, modes="ar,apar,serial,llamacpp", spec=None, draft_head=None, temperature=0.0, seed=None,
    )
    latency.run(args)
    saved = json.loads((tmp_path / "lat.json").read_text())
    for q in saved["questions"]:  # the engine's AR on llama.cpp is llama.cpp's own greedy loop
        assert q["modes"]["ar"]["text"] == q["modes"]["llamacpp"]["text"]
    assert {"apar_vs_llamacpp", "ar_vs_llamacpp"} <= set(saved["speedup_tok_s"])
    assert saved["config"]["backend"] == "llamacpp" and saved["config"]["quant"] == "q8_0"
    assert all(q["modes"]["ar"]["tokens"] > 0 for q in saved["questions"])
    assert main(["generate", "Hi", "--model", str(tiny_dir), "--backend", "llamacpp", "--max-tokens", "6",
                 "--mode", "ar", "--cpu-threads", "1"]) == 0
    with pytest.raises(ValueError, match="GGUF type: backend='llamacpp' only"):
        LLM(str(tiny_dir), quant="q8_0")


def test_latency_bench_puts_llamacpps_own_loop_beside_apar_on_the_torch_backend(tiny_dir, tmp_path):
    """Modes llamacpp and llamacpp-f16 on the torch engine: llama.cpp alone on the same model
    exported to Q8_0 and to F16, in the same run as the engine's modes."""
    import json
    from types import SimpleNamespace

    from parafork.bench import latency

    args = SimpleNamespace(
        model=str(tiny_dir), base_model=str(tiny_dir), adapter=None, dtype="float32", cpu_threads=1, suite="starter",
        backend="torch", quant=None, limit=1, per_category=None, max_tokens=10, json=str(tmp_path / "lat.json"),
        plot=None, modes="ar,apar,llamacpp,llamacpp-f16", spec=None, draft_head=None, temperature=0.0, seed=None,
    )
    latency.run(args)
    saved = json.loads((tmp_path / "lat.json").read_text())
    q = saved["questions"][0]["modes"]
    assert q["llamacpp"]["gguf"].endswith("-q8_0.gguf") and q["llamacpp"]["tokens"] > 0
    assert q["llamacpp-f16"]["gguf"].endswith("-f16.gguf") and q["llamacpp-f16"]["tokens"] > 0
    assert saved["config"]["backend"] == "torch" and {"apar_vs_llamacpp", "ar_vs_llamacpp", "apar_vs_llamacpp_f16",
                                                       "ar_vs_llamacpp_f16"} <= set(saved["speedup_tok_s"])


def test_the_openai_server_answers_from_the_llamacpp_backend(tiny_dir):
    import openai

    from parafork.server import create_app

    from .test_server import start_server

    llm = tiny_llamacpp(tiny_dir)
    url, srv, thread = start_server(create_app(llm, "tiny-gguf"))
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Tell me three things."}]
        full = c.chat.completions.create(model="tiny-gguf", messages=msgs, max_tokens=12, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny-gguf", messages=msgs, max_tokens=12, temperature=0, stream=True) if ch.choices)
        assert full.usage.completion_tokens == 12 and streamed == full.choices[0].message.content
    finally:
        srv.should_exit = True
        thread.join(10)
    llm.check_idle()
    assert all(llm.engine.runner.cells_in_use(s) == (-1, -1) for s in range(MAX_SEQUENCES))
