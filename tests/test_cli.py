"""The command line and the engine benchmark, on the tiny model."""
import json

import pytest

from parafork.bench import engine as bench_engine
from parafork.cli import main
from parafork.llm import LLM
from parafork.sampling import SamplingParams


def test_generate_prints_the_answer_and_the_figures(tiny_dir, capsys):
    code = main(["generate", "Hello there", "--model", str(tiny_dir), "--max-tokens", "6", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[apar] 6 tokens, 6 steps, 1 threads" in out


def test_generate_reports_bad_input_as_an_error(tiny_dir, capsys):
    assert main(["generate", "Hi", "--model", str(tiny_dir), "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["generate", "Hi", "--model", "no/such-model"]) == 2


def test_generate_takes_stop_strings_and_penalties(tiny_dir, tiny_llm, capsys):
    params = dict(max_tokens=20, mode="ar")
    plain = tiny_llm.generate("Hello there", SamplingParams(**params))[0].text
    penalized = tiny_llm.generate("Hello there", SamplingParams(frequency_penalty=2.0, **params))[0].text
    assert plain != penalized
    command = ["generate", "Hello there", "--model", str(tiny_dir), "--max-tokens", "20", "--mode", "ar", "--dtype", "float32"]
    assert main(command + ["--frequency-penalty", "2"]) == 0
    assert capsys.readouterr().out.startswith(penalized + "\n")
    stop = penalized[len(penalized) // 2 :][:3]
    assert main(command + ["--frequency-penalty", "2", "--stop", stop]) == 0
    out = capsys.readouterr().out
    assert out.startswith(penalized[: penalized.index(stop)] + "\n") and "finish=stop" in out
    assert main(command + ["--presence-penalty", "7"]) == 2
    assert "presence_penalty must be in [-2, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--stop not supported with --remote"):
        main(["generate", "Hi", "--remote", "http://127.0.0.1:9/v1", "--stop", "x"])


def test_generate_drafts_with_a_trained_head_and_refuses_drafts_for_a_server(tiny_dir, head_dir, capsys):
    command = ["generate", "Hello there", "--model", str(tiny_dir), "--max-tokens", "24", "--mode", "ar", "--dtype", "float32"]
    assert main(command) == 0
    plain = capsys.readouterr().out
    assert main(command + ["--speculative", "eagle", "--draft-head", str(head_dir)]) == 0
    drafted = capsys.readouterr().out
    assert drafted.split("\n")[0] == plain.split("\n")[0]  # (whether drafts pay here is the step cost's call)
    assert main(command + ["--speculative", "eagle"]) == 2  # without --draft-head: the bundled adapter's head
    assert "trained for adapter" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--speculative and --draft-head drive parafork's own engine"):
        main(["generate", "Hi", "--remote", "http://127.0.0.1:9/v1", "--speculative", "ngram"])


def test_bench_engine_writes_every_documented_key(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "engine", "--model", str(tiny_dir), "--dtype", "float32", "--cpu-threads", "1", "--tokens", "8",
            "--steps", "2", "--prefill", "40,300", "--json", str(out)]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    for key in ("dtype", "hf_tok_s", "ar_tok_s", "ar_vs_hf", "step_ms", "bandwidth_gbs", "achieved_gbs", "prefill"):
        assert key in saved
    assert set(saved["step_ms"]) == set(saved["step_ms_independent"]) == {"1", "2", "4", "8", "16", "32", "64"}
    independent = list(saved["step_ms_independent"].values())
    assert independent == sorted(independent) and independent[0] > 0  # the engine's curve: never cheaper with more rows
    assert saved["ar_vs_hf"] == saved["ar_tok_s"] / saved["hf_tok_s"]
    assert set(saved["prefill"]) == {"40", "300"} and all(v["tok_s"] > 0 and v["hf_tok_s"] > 0 for v in saved["prefill"].values())
    assert main(argv[:-4] + ["--prefill", "2048"]) == 2
    assert "longer than the model's 1024 positions" in capsys.readouterr().err


def test_bench_engine_on_llamacpp_compares_with_llamacpp_alone_on_the_same_gguf(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "engine", "--model", str(tiny_dir), "--backend", "llamacpp", "--quant", "q8_0", "--cpu-threads", "1",
            "--tokens", "8", "--steps", "2", "--prefill", "40", "--json", str(out)]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["prefill"]["40"]["tok_s"] > 0 and saved["prefill"]["40"]["hf_tok_s"] is None
    assert saved["backend"] == "llamacpp" and saved["quant"] == "q8_0" and saved["gguf"].endswith("-q8_0.gguf")
    assert saved["hf_tok_s"] is None and saved["ar_vs_llamacpp"] == saved["ar_tok_s"] / saved["llamacpp_own_tok_s"]
    assert set(saved["step_ms"]) == {"1", "2", "4", "8", "16", "32"}  # 64 siblings and their root: over its 64 ids
    assert saved["step_ms_independent"] is None  # llama.cpp's steps cannot be timed on an empty pool


def test_bench_engine_puts_backends_side_by_side_with_the_floor_and_a_plot(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "steps.png"
    argv = ["bench", "engine", "--model", str(tiny_dir), "--dtype", "float32", "--cpu-threads", "1", "--tokens", "8",
            "--steps", "2", "--prefill", "40", "--also", "torch:int8", "--also", "llamacpp:q8_0", "--json", str(out),
            "--plot", str(png)]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    runs = [saved, *saved["also"]]
    assert [r["backend"] for r in runs] == ["torch", "torch", "llamacpp"] and runs[2]["quant"] == "q8_0"  # "auto" resolved
    assert runs[1]["dtype"] == "int8 weights, float32" and runs[1]["weight_bytes"] < 0.3 * runs[0]["weight_bytes"]
    for r in runs:  # the floor: weight bytes over the bandwidth measured in the same run
        assert r["floor_ms"] == pytest.approx(r["weight_bytes"] / (r["bandwidth_gbs"] * 1e9) * 1e3)
        assert r["floor_share"]["8"] == pytest.approx(r["floor_ms"] / r["step_ms"]["8"])
    assert "of the floor" in capsys.readouterr().out and png.stat().st_size > 0
    assert main(argv[:-8] + ["--also", "llamacpp:q4_0"]) == 2
    assert main(argv[:-8] + ["--also", "torch:q8_0"]) == 2
    assert "torch takes int8" in capsys.readouterr().err


def test_step_timing_takes_blocks_and_sequence_ids_from_the_engine_and_gives_them_back(tiny_llm):
    """The timed threads are forked through the block manager: the pool and the prefix cache
    stay consistent, so a later request over the same tokens gets the same answer."""
    ids = list(range(500, 530))
    params = SamplingParams(max_tokens=8, mode="ar")
    before = tiny_llm.generate({"prompt_token_ids": ids}, params)[0].token_ids
    assert bench_engine.step_ms(tiny_llm, ids, threads=4, context=37, steps=2) > 0
    tiny_llm.check_idle()
    assert tiny_llm.generate({"prompt_token_ids": ids}, params)[0].token_ids == before


def test_chunked_prefill_gives_the_same_answer(tiny_dir, tiny_llm):
    chunked = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4, max_batch_tokens=5)
    prompts = [{"prompt_token_ids": list(range(800, 823))}, {"prompt_token_ids": list(range(900, 911))}]
    params = SamplingParams(max_tokens=12, mode="ar")
    assert [o.token_ids for o in chunked.generate(prompts, params)] == [
        o.token_ids for o in tiny_llm.generate(prompts, params)
    ]


def test_demo_shows_threads_live_and_compares_like_with_like(tiny_llm, capsys):
    from dataclasses import replace

    from parafork import demo
    from parafork.rules import ForceForks

    force = ForceForks(tiny_llm.control, frozenset({3, 7}), child_tokens=6, root_tokens=10)
    prompt = {"prompt_token_ids": list(range(600, 612))}
    apar = demo.run_apar(tiny_llm, prompt, SamplingParams(max_tokens=200, logits_rules=[force]), live=True)
    shown = capsys.readouterr().out
    assert apar.out.finished and apar.out.num_threads == 3
    assert "APAR threads" in shown and "done" in shown  # the live table, with both children finished
    tiny_llm.check_idle()
    serial = demo.Run("serial", replace(apar.out, num_steps=apar.out.num_steps * 2), apar.seconds * 2)
    base = demo.Run("base", replace(apar.out, finish_reason="length"), apar.seconds * 3)
    same, _, machine = demo.verdict(apar, serial, base, "Some CPU, float32, 2 CPU threads")
    assert "2.00x faster" in same and "identical text" in same and machine.endswith("2 CPU threads")
    other = demo.Run("serial", replace(apar.out, text=apar.out.text + "!"), apar.seconds * 2)
    differ = demo.verdict(apar, other, base, "m")
    assert "tokens/s" in differ[0] and "wall clock would not compare" in differ[0]
    assert "base model's (cut at max_tokens)" in differ[1] and "APAR answer (complete)" in differ[1]
    single = demo.Run("apar", replace(apar.out, num_threads=1), apar.seconds)
    assert "did not fork" in demo.verdict(single, serial, base, "m")[0]
    assert not any("did not fork" in line for line in same)
    assert not any("joined" in line for line in same)  # this tree never joined: the verdict does not say so
    joined = demo.Run("apar", replace(apar.out, shape=replace(apar.out.shape, joins=2)), apar.seconds)
    assert any("APAR joined 2x" in line for line in demo.verdict(joined, serial, base, "m"))
    assert " 2 joins" in joined.figures()


def test_demo_shows_the_text_written_after_each_join(tiny_llm):
    from parafork import demo
    from parafork.rules import ForceForks

    # The root's own tokens: [Fork] at 3 and 8, [Join] at 12, [Fork] at 16 and 20, [Join] at 24, end at 30.
    force = ForceForks(tiny_llm.control, frozenset({3, 8, 16, 20}), child_tokens=6, root_tokens=30, join_after=frozenset({12, 24}))
    roots = set()
    params = SamplingParams(max_tokens=300, join=True, plan_budget=False, no_repeat_heads=False,
                            logits_rules=[force, lambda thread, logits: roots.add(thread.request.root)])
    apar = demo.run_apar(tiny_llm, {"prompt_token_ids": list(range(600, 612))}, params, live=False)
    assert apar.out.finished and apar.out.shape.joins == 2
    (root,) = roots
    decode = lambda ids: tiny_llm.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    own = root.own_tokens
    assert apar.after_joins == [(2, decode(own[13:16])), (2, decode(own[25:]))]
    tiny_llm.check_idle()
