"""The paper's benchmarks (latency, throughput, quality) on the tiny model: suites, figures
that must agree with the engine and with HF, JSON schema, plots."""
import json
import os
from types import SimpleNamespace

import pytest

from parafork.bench import latency, quality, throughput
from parafork.bench.common import machine_key, parse_list
from parafork.bench.suite import load_suite, reference_answers, select
from parafork.cli import main


def _args(tiny_dir, tmp_path, **extra) -> SimpleNamespace:
    base = dict(
        model=str(tiny_dir), base_model=str(tiny_dir), adapter=None, dtype="float32", cpu_threads=1, suite="starter",
        backend="auto", quant=None, spec=None, draft_head=None, temperature=0.0, seed=None,
        limit=None, per_category=None, max_tokens=12, json=str(tmp_path / "out.json"), plot=str(tmp_path / "out.png"),
    )
    return SimpleNamespace(**{**base, **extra})


def test_suites_load_and_select():
    starter, mtbench = load_suite("starter"), load_suite("mtbench")
    assert len(starter) == 18 and len(mtbench) == 80
    assert len({q["category"] for q in mtbench}) == 8
    # The starter set has Vicuna Bench's nine categories, two questions each.
    assert {q["category"] for q in starter} == {"generic", "knowledge", "roleplay", "common-sense", "fermi",
                                                 "counterfactual", "coding", "math", "writing"}
    assert len(select(starter, per_category=1)) == 9
    picked = select(mtbench, per_category=2)
    assert len(picked) == 16 and all(sum(p["category"] == q["category"] for p in picked) == 2 for q in picked)
    assert len(select(starter, limit=5)) == 5
    refs = reference_answers("mtbench")
    assert len(refs) == 30 and all(isinstance(r, str) and r for r in refs.values())
    assert reference_answers("starter") == {}


def test_vicuna_without_its_file_fails_at_once_naming_where_to_get_it(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PARAFORK_VICUNA", raising=False)
    with pytest.raises(FileNotFoundError, match="PARAFORK_VICUNA=.*vicuna_bench/question.jsonl|vicuna_bench/question.jsonl.*PARAFORK_VICUNA"):
        load_suite("vicuna")
    monkeypatch.setenv("PARAFORK_VICUNA", str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_suite("vicuna")
    monkeypatch.delenv("PARAFORK_VICUNA")
    assert main(["bench", "latency", "--model", str(tiny_dir), "--suite", "vicuna"]) == 2
    assert "PARAFORK_VICUNA" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("PARAFORK_VICUNA"), reason="Vicuna Bench's file is not here (CI sets PARAFORK_VICUNA)")
def test_the_real_vicuna_file_loads():
    vicuna = load_suite("vicuna")
    assert len(vicuna) == 80 and len({q["category"] for q in vicuna}) == 9
    assert reference_answers("vicuna") == {}


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"question_id": 1, "category": "x", "turns": ["a"]}\n{"oops": 2}\n', "bad.jsonl:2"),
        ("not json\n", "bad.jsonl:1"),
        ('{"question_id": 1, "category": "x", "turns": []}\n', "bad.jsonl:1"),
        ('{"question_id": 1, "category": "x", "turns": [42]}\n', "bad.jsonl:1"),
        ("\n\n", "holds no questions"),
    ],
)
def test_bad_suite_files_give_a_clear_error(tmp_path, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_suite(bad)


def test_cli_reports_a_missing_suite(tiny_dir, tmp_path, capsys):
    code = main(["bench", "latency", "--model", str(tiny_dir), "--suite", str(tmp_path / "none.jsonl")])
    assert code == 2 and "none.jsonl" in capsys.readouterr().err
    assert main(["bench", "latency", "--model", str(tiny_dir), "--suite", "starter", "--modes", "ar,turbo"]) == 2


def test_answer_checks():
    assert latency.numbering_intact("1. a\n2. b\n3. c\n\nThen:\n1. x\n2. y")
    assert not latency.numbering_intact("1. a\n3. b")
    assert latency.numbering_intact("no list at all")
    assert latency.answer_checks("1. a [Fork]\n2. b") == {"closes_after_list": False, "paragraphs": 0,
        "stray_control": 1, "numbering_intact": True, "repeated_head": False, "cut": False}
    checks = latency.answer_checks("1. Sleep well: x\n2. **sleep well** y\n3. Eat", "length")
    assert checks["repeated_head"] and checks["cut"]


def test_answer_layout_finds_prose_after_a_list_and_prose_answers():
    assert latency.answer_checks("Tips:\n\n1. Sleep: a\n2. Eat: b\n3. Walk: c\n\nIn short, rest.")["closes_after_list"]
    assert not latency.answer_checks("Tips:\n\n1. Sleep: a\n2. Eat: b\n3. Walk: c\n")["closes_after_list"]
    assert not latency.answer_checks("Two:\n\n1. Sleep: a\n2. Eat: b\n\nIn short, rest.")["closes_after_list"]  # under 3 items
    assert latency.answer_checks("One.\n\nTwo.\n\nThree.")["paragraphs"] == 3
    assert latency.answer_checks("One.\n\n1. a\n2. b\n3. c\n\nThree.")["paragraphs"] == 0  # it has a list


def test_tree_shapes_count_joins_and_the_rates_over_their_own_answers():
    base = {"wall_s": 1.0, "prefill_s": None, "steps": 1, "generated": 10, "tokens": 10, "peak_kv_blocks": 1,
            "attn_work": 1}
    records = [
        {"threads": 4, "joins": 1, "depth": 2, "spine_tokens": 6, "longest_branch_tokens": 9, "closes_after_list": True},
        {"threads": 3, "joins": 0, "depth": 3, "spine_tokens": 8, "longest_branch_tokens": 5, "closes_after_list": True},
        {"threads": 3, "joins": 2, "depth": 2, "spine_tokens": 4, "longest_branch_tokens": 3, "paragraphs": 4},
        {"threads": 1, "joins": 0, "depth": 1, "spine_tokens": 10, "longest_branch_tokens": 0, "paragraphs": 3},
        {"threads": 1, "joins": 0, "depth": 1, "spine_tokens": 10, "longest_branch_tokens": 0, "closes_after_list": True},
    ]
    got = latency.aggregate([{**base, **r} for r in records])
    assert got["join_rate"] == 2 / 5 and got["joins_mean"] == 3 / 5 and got["depth_max"] == 3
    assert got["spine_tokens_mean"] == 38 / 5 and got["longest_branch_tokens_mean"] == 17 / 5
    assert got["prose_answers"] == 2 and got["prose_fork_rate"] == 1 / 2
    # Only forked answers count for joins after a list (an unforked list has nothing to join).
    assert got["closing_after_list"] == 2 and got["join_after_list_rate"] == 1 / 2
    one_sequence = latency.aggregate([{**base, "threads": 1}])  # hf, llama.cpp: no shape fields
    assert one_sequence["spine_tokens_mean"] == 10 and one_sequence["prose_fork_rate"] is None


def test_early_stop_marks_short_ar_answers_only_where_apar_forks():
    def rec(ar_tokens, apar_threads):
        record = {"modes": {"ar": {"tokens": ar_tokens}, "apar": {"threads": apar_threads}}}
        latency.mark_early_stops(record)
        return record["modes"]["ar"]["early_stop"]

    assert rec(59, 3) and not rec(60, 3) and not rec(10, 1)
    records = [{"tokens": 5, "early_stop": True}, {"tokens": 200, "early_stop": False}]
    base = {"wall_s": 1.0, "prefill_s": None, "steps": 1, "generated": 1, "peak_kv_blocks": 1, "attn_work": 1, "threads": 1}
    assert latency.aggregate([{**base, **r} for r in records])["early_stop_rate"] == 0.5


def test_latency_figures_agree_with_hf_and_the_engine(tiny_dir, tmp_path):
    args = _args(tiny_dir, tmp_path, modes="ar,apar,serial,base,hf,sot", limit=3)
    result = latency.run(args)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.png").stat().st_size > 0
    for mode in ("ar", "apar", "serial", "base", "hf", "sot"):
        assert set(saved["modes"][mode]) >= {
            "tokens", "steps", "wall_s", "tok_s", "peak_kv_blocks", "attn_work", "fork_rate", "threads_mean", "step_ms",
            "stray_control", "numbering_intact", "repeated_head_rate", "cut_rate", "early_stop_rate",
        }
    apar = saved["modes"]["apar"]
    decode_s = apar["wall_s"] - sum(q["modes"]["apar"]["prefill_s"] for q in saved["questions"])
    assert apar["step_ms"] == pytest.approx(1000 * decode_s / apar["steps"]) and 0 < decode_s < apar["wall_s"]
    assert set(saved["speedup"]) == {"apar_vs_ar", "apar_vs_serial", "apar_vs_base", "apar_vs_hf", "sot_vs_ar"}
    assert set(saved["speedup_tok_s"]) == set(saved["speedup"])
    assert saved["speedup"]["apar_vs_ar"] == pytest.approx(saved["modes"]["ar"]["wall_s"] / saved["modes"]["apar"]["wall_s"])
    assert set(saved["per_category"]) == {"generic", "knowledge"} and len(saved["questions"]) == 3
    for q in result["questions"]:
        ar, hf = q["modes"]["ar"], q["modes"]["hf"]
        assert q["modes"]["base"]["text"] == ar["text"]  # here the "tuned" model is the base model too
        assert ar["early_stop"] == (ar["tokens"] < 60 and q["modes"]["apar"]["threads"] > 1)
        # Greedy fp32: our AR and HF generate decode the same tokens, so every count agrees,
        # and HF's closed-form KV and attention work check the engine's bookkeeping.
        assert ar["text"] == hf["text"]
        for key in ("tokens", "generated", "steps", "peak_kv_blocks", "attn_work"):
            assert ar[key] == hf[key], key
        prompt = len(latency.models.apply_chat_template(hf_tokenizer(tiny_dir), q["prompt"]))
        total = prompt + ar["generated"]
        assert ar["attn_work"] == (total - 1) * total // 2
        assert ar["steps"] == ar["generated"] and ar["threads"] == 1


def test_latency_with_spec_adds_the_speculative_modes_and_their_figures(tiny_dir, tmp_path):
    result = latency.run(_args(tiny_dir, tmp_path, modes="ar,apar,serial", spec="ngram", limit=2, max_tokens=40))
    assert (tmp_path / "out.png").stat().st_size > 0  # with its panel of tokens per verify step
    assert result["config"]["modes"] == ["ar", "apar", "serial", "ar+spec", "apar+spec"]
    assert {"apar_spec_vs_apar", "apar_spec_vs_serial", "ar_spec_vs_ar"} <= set(result["speedup_tok_s"])
    spec = result["modes"]["ar+spec"]
    assert spec["acceptance"] > 0 and spec["accepted_per_step"] > 0 and result["modes"]["ar"]["acceptance"] == 0
    for q in result["questions"]:  # greedy: drafts change the steps, not the answer
        for mode in ("ar", "apar"):
            assert q["modes"][f"{mode}+spec"]["same_as_plain"] and q["modes"][f"{mode}+spec"]["text"] == q["modes"][mode]["text"]
        ar, spec = q["modes"]["ar"], q["modes"]["ar+spec"]
        assert spec["steps"] == ar["steps"] - spec["accepted"]
    assert result["per_category"]["generic"]["modes"]["apar+spec"]["acceptance"] >= 0


def test_latency_runs_lookup_beside_a_head(tiny_dir, head_dir, tmp_path):
    # +ngram modes draft by lookup whatever --spec is, beside the head's +spec modes, in one run.
    # --modes names ar+spec: --spec adds no apar+spec.
    result = latency.run(_args(tiny_dir, tmp_path, modes="ar,ar+ngram,ar+spec", spec="eagle", draft_head=str(head_dir),
                               limit=2, max_tokens=40, plot=None))
    assert result["config"]["modes"] == ["ar", "ar+ngram", "ar+spec"]
    ngram, spec = result["modes"]["ar+ngram"], result["modes"]["ar+spec"]
    assert ngram["accepted_per_step"] > 0 and ngram["head_share"] == 0 and ngram["same_as_plain_rate"] == 1.0
    assert spec["same_as_plain_rate"] == 1.0 and {"ar_ngram_vs_ar", "ar_spec_vs_ar_ngram"} <= set(result["speedup_tok_s"])


def test_latency_samples_the_engine_modes_at_the_temperature_given(tiny_dir, tmp_path):
    # --temperature: the tuned model's modes sample, seeded per question (a rerun draws the same
    # answers); sampled answers have no text to compare with the plain mode's (None, not False).
    args = dict(modes="ar", spec="ngram", limit=2, max_tokens=30, plot=None)
    greedy = latency.run(_args(tiny_dir, tmp_path, **args, json=str(tmp_path / "g.json")))
    sampled = [latency.run(_args(tiny_dir, tmp_path, **args, temperature=1.0, seed=3, json=str(tmp_path / f"s{i}.json")))
               for i in range(2)]
    assert sampled[0]["config"]["temperature"] == 1.0 and greedy["config"]["temperature"] == 0.0
    texts = [[q["modes"]["ar"]["text"] for q in r["questions"]] for r in (greedy, *sampled)]
    assert texts[1] == texts[2] and texts[1] != texts[0]
    assert all(q["modes"]["ar+spec"]["same_as_plain"] is None for q in sampled[0]["questions"])
    assert sampled[0]["modes"]["ar+spec"]["same_as_plain_rate"] is None
    assert greedy["modes"]["ar+spec"]["same_as_plain_rate"] == 1.0
    with pytest.raises(ValueError, match="temperature"):
        latency.run(_args(tiny_dir, tmp_path, **args, temperature=-1.0))
    # Options that would change nothing are refused, not ignored: a seed for greedy answers, a head
    # for lookup's drafts.
    with pytest.raises(ValueError, match="--seed applies with --temperature"):
        latency.run(_args(tiny_dir, tmp_path, **args, seed=3))
    with pytest.raises(ValueError, match="--draft-head applies with --spec eagle"):
        latency.run(_args(tiny_dir, tmp_path, **args, draft_head="bundled"))
    # +spec modes without --spec: nothing says what drafts.
    with pytest.raises(ValueError, match="--modes ar\\+spec needs --spec"):
        latency.run(_args(tiny_dir, tmp_path, **{**args, "modes": "ar,ar+spec", "spec": None}))


def test_unguarded_modes_and_penalties_reach_the_requests(tiny_dir, tmp_path):
    # The -unguarded modes send the request without the answer guards; the others the given penalties.
    penalties = {"frequency_penalty": 0.5, "presence_penalty": 0.25, "repetition_penalty": 1.2}
    guarded = latency.engine_params("apar", 99, penalties)
    assert (guarded.mode, guarded.plan_budget, guarded.no_repeat_heads, guarded.speculative) == ("apar", True, True, "off")
    assert {k: getattr(guarded, k) for k in penalties} == penalties
    for mode in ("apar-unguarded", "serial-unguarded"):
        p = latency.engine_params(mode, 99, penalties)
        assert p.mode == mode.split("-")[0] and not p.plan_budget and not p.no_repeat_heads and not p.penalized
    assert latency.engine_params("apar+spec", 99, penalties).speculative == "ngram"
    # On the tiny model: a penalty changes the guarded answers and leaves the unguarded ones alone.
    runs = {}
    for fp in (0.0, 1.5):
        args = _args(tiny_dir, tmp_path, modes="ar,apar,serial,apar-unguarded,serial-unguarded", limit=2, max_tokens=40,
                     plot=None, json=str(tmp_path / f"fp{fp}.json"), frequency_penalty=fp)
        runs[fp] = latency.run(args)
        assert runs[fp]["config"]["penalties"]["frequency_penalty"] == fp
        assert {"apar_vs_serial_unguarded", "apar_vs_apar_unguarded"} <= set(runs[fp]["speedup_tok_s"])
    texts = {fp: [(q["modes"]["ar"]["text"], q["modes"]["apar-unguarded"]["text"]) for q in r["questions"]]
             for fp, r in runs.items()}
    assert [a for a, _ in texts[0.0]] != [a for a, _ in texts[1.5]]
    assert [u for _, u in texts[0.0]] == [u for _, u in texts[1.5]]


def test_an_interrupted_latency_run_resumes_from_its_checkpoint(tiny_dir, tmp_path):
    args = _args(tiny_dir, tmp_path, modes="ar,apar", limit=2, plot=None)
    first = latency.run(args)
    partial = tmp_path / "out.json.partial.jsonl"
    assert not partial.exists()  # a finished run leaves only its JSON
    # Stopped after question 1 (the last line cut short): the rerun keeps that record, redoes question 2.
    done = {**first["questions"][0], "modes": {m: {**r, "text": "kept"} for m, r in first["questions"][0]["modes"].items()}}
    config = {k: v for k, v in first["config"].items() if k != "suite"}  # run() adds the suite
    header = {"config": {**config, "machine": machine_key()}}
    partial.write_text(json.dumps(header) + "\n" + json.dumps(done) + "\n" + '{"id": 2, "mod')
    resumed = latency.run(args)
    assert [q["modes"]["ar"]["text"] == "kept" for q in resumed["questions"]] == [True, False]
    assert resumed["questions"][1]["modes"]["ar"]["text"] == first["questions"][1]["modes"]["ar"]["text"]
    assert not partial.exists()
    # A checkpoint of another configuration or CPU, or a record of another question under the same id, is not used.
    for other in ({"max_tokens": 99}, {"machine": "Other CPU (AVX512)"}, {"adapter_digest": "0123456789ab"}):
        partial.write_text(json.dumps({"config": {**header["config"], **other}}) + "\n" + json.dumps(done) + "\n")
        assert all(q["modes"]["ar"]["text"] != "kept" for q in latency.run(args)["questions"])
    partial.write_text(json.dumps(header) + "\n" + json.dumps({**done, "prompt": "another question"}) + "\n")
    assert all(q["modes"]["ar"]["text"] != "kept" for q in latency.run(args)["questions"])


def hf_tokenizer(path):
    from parafork import models

    return models.load_tokenizer(path)[0]


def test_sot_expands_every_skeleton_point_in_parallel(tiny_llm, monkeypatch):
    from parafork.bench import sot

    assert sot.parse_skeleton("1. Sleep early\n2) Eat well\nnot a point\n3. Move") == ["Sleep early", "Eat well", "Move"]
    # The tiny model writes no outline: give it one, and the points must run as one batch.
    monkeypatch.setattr(sot, "parse_skeleton", lambda text: ["Sleep early", "Eat well", "Move"])
    points = []
    real_timed_run = sot.timed_run

    def spy(llm, prompts, params):
        run = real_timed_run(llm, prompts, params)
        points.append((len(prompts), run.steps, [o.num_steps for o in run.outputs]))
        return run

    monkeypatch.setattr(sot, "timed_run", spy)
    answer = sot.answer(tiny_llm, "Give me tips.", max_tokens=60)
    (n_skeleton, skeleton_steps, _), (n_points, point_steps, per_point) = points
    assert n_skeleton == 1 and n_points == 3 and answer["threads"] == 3
    assert point_steps == max(per_point) < sum(per_point)  # side by side, not one after another
    assert answer["steps"] == skeleton_steps + point_steps
    assert answer["text"].startswith("1. Sleep early") and "\n3. Move" in answer["text"]
    tiny_llm.check_idle()


def _targs(tiny_dir, tmp_path, **extra) -> SimpleNamespace:
    return _args(tiny_dir, tmp_path, **{"modes": "ar,serial,apar", **extra})


def test_throughput_closed_loop_loses_nothing_and_writes_plots(tiny_dir, tmp_path, monkeypatch):
    args = _targs(tiny_dir, tmp_path, limit=4, concurrency="1,3", kv_blocks="8,64", requests_per_client=2, rounds=1)
    result = throughput.run(args)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert (tmp_path / "out.png").stat().st_size > 0
    assert len(saved["runs"]) == 2 * 2 * 3 and len(saved["comparison"]) == 2 * 2 * 2
    for r in result["runs"]:
        assert r["requests"] == r["completed"] == 2 * r["concurrency"] and r["tokens"] > 0
        assert r["peak_kv_blocks"] <= r["kv_blocks"]
        assert r["latency_p50"] <= r["latency_p99"]
    # --rounds: every point N times, the modes' order reversed every other round; means reported.
    order, real_closed_loop = [], throughput.closed_loop

    def spy(llm, prompts, c, params, bar):
        order.append(params.mode)
        return real_closed_loop(llm, prompts, c, params, bar)

    monkeypatch.setattr(throughput, "closed_loop", spy)
    result = throughput.run(_targs(tiny_dir, tmp_path, limit=2, concurrency="2", kv_blocks="64", requests_per_client=1,
                                  rounds=2))
    assert order == ["ar", "serial", "apar", "apar", "serial", "ar"]
    for r in result["runs"]:
        assert len(r["per_round"]) == 2
        assert r["tok_s"] == pytest.approx(sum(x["tok_s"] for x in r["per_round"]) / 2)
    assert all(len(row["throughput_gain_pct_rounds"]) == 2 for row in result["comparison"])
    with pytest.raises(ValueError, match="--rounds"):
        throughput.run(_targs(tiny_dir, tmp_path, limit=2, concurrency="2", kv_blocks="64", requests_per_client=1, rounds=0))
    # +spec modes: compared with the same mode without drafts; they need --spec, and --spec them.
    order.clear()
    result = throughput.run(_targs(tiny_dir, tmp_path, limit=2, concurrency="2", kv_blocks="64", requests_per_client=1,
                                  rounds=1, modes="apar,apar+spec", spec="ngram"))
    assert order == ["apar", "apar"]
    assert [(r["mode"], r["baseline"]) for r in result["comparison"]] == [("apar+spec", "apar")]
    for bad in (dict(modes="apar+spec", spec=None), dict(modes="apar", spec="ngram")):
        with pytest.raises(ValueError, match="--spec"):
            throughput.run(_targs(tiny_dir, tmp_path, limit=2, concurrency="2", kv_blocks="64", requests_per_client=1,
                                 rounds=1, **bad))
    with pytest.raises(ValueError, match="--modes"):
        throughput.run(_targs(tiny_dir, tmp_path, limit=2, concurrency="2", kv_blocks="64", requests_per_client=1,
                             rounds=1, modes="apar,fast"))
    with pytest.raises(ValueError, match="--draft-head applies with --spec eagle"):
        throughput.run(_targs(tiny_dir, tmp_path, limit=2, concurrency="2", kv_blocks="64", requests_per_client=1,
                             rounds=1, modes="apar,apar+spec", spec="ngram", draft_head="bundled"))
    with pytest.raises(ValueError, match="--concurrency"):
        parse_list("1,x", "--concurrency", int)
    with pytest.raises(ValueError, match="--kv-blocks"):
        parse_list("0", "--kv-blocks", int)
    assert parse_list("8, 64", "--kv-blocks", int) == [8, 64]


def test_quality_metrics_and_deltas(tiny_dir, tmp_path):
    questions = select(load_suite("mtbench"), per_category=1)
    refs = reference_answers("mtbench")
    with_ref = [q for q in questions if q["id"] in refs]
    assert with_ref
    # Answers from a latency JSON: APAR answers the reference itself, AR something unrelated.
    records = [
        {"id": q["id"], "modes": {
            "apar": {"text": refs.get(q["id"], "1. One\n2. Two")},
            "ar": {"text": "Bananas are yellow and grow in bunches."},
            "hf": {"text": "I do not know."},
        }}
        for q in questions
    ]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"questions": records}))
    answers = quality.answers_from_latency(str(path), questions)
    result = quality.run_quality(questions, answers, refs, str(tiny_dir), threads=1)
    for q in result["questions"]:
        apar, ar = q["modes"]["apar"], q["modes"]["ar"]
        if q["id"] in refs:
            assert apar["similarity"] == pytest.approx(1.0, abs=1e-4) and ar["similarity"] < 0.5
        else:
            assert apar["similarity"] is None and apar["list_items"] == 2
        assert apar["stray_control"] == 0 and apar["nll"] > 0
    m, d = result["metrics"], result["delta_pct"]
    assert d["similarity"] == pytest.approx(100 * (m["apar"]["similarity"] - m["ar"]["similarity"]) / m["ar"]["similarity"])
    assert set(d) == set(quality.DELTA_METRICS) and set(m) == {"apar", "ar", "base"}
    quality.plot({**result, "date": "today", "commit": "x"}, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no answers"):
        quality.answers_from_latency(str(path), [{"id": -1, "category": "x", "prompt": "?"}])


def test_rep4_counts_repeated_word_4grams():
    assert quality.rep4("Bananas are yellow and grow in bunches.") == 0.0
    assert quality.rep4("too short here") is None
    # "a b c d a b c d": 5 four-grams, of which "a b c d" repeats once -> 1/5.
    assert quality.rep4("A b c d a B c d") == pytest.approx(1 / 5)
    loop = "Stay focused on your goals. " * 20
    assert quality.rep4(loop) > 0.9 and quality.structure(loop)["rep4"] == quality.rep4(loop)


def test_quality_reuses_latency_answers_and_generates_only_the_missing_base_ones(tiny_dir, tmp_path):
    questions = select(load_suite("starter"), limit=2)
    records = [{"id": q["id"], "modes": {"apar": {"text": f"1. A{i}\n2. B{i}"}, "ar": {"text": f"Short {i}."}}}
               for i, q in enumerate(questions)]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"questions": records, "config": {"adapter_digest": "latency-run"}}))
    assert set(quality.answers_from_latency(str(path), questions)) == {"apar", "ar"}
    result = quality.run(_args(tiny_dir, tmp_path, limit=2, answers=str(path)))
    # The tuned answers are the latency run's: its config describes them, not this run's --adapter.
    config = result["config"]
    assert config["answers_config"] == {"adapter_digest": "latency-run"} and config["generated_modes"] == ["base"]
    assert config["adapter"] is None and config["adapter_digest"] is None
    for i, q in enumerate(result["questions"]):
        assert q["modes"]["apar"]["text"] == f"1. A{i}\n2. B{i}" and q["modes"]["ar"]["text"] == f"Short {i}."
        assert q["modes"]["base"]["tokens"] > 0  # generated by the (tiny) base model
        assert q["modes"]["base"]["threads"] == 1 and q["modes"]["base"]["cut"] in (True, False)
    # A mode missing for one question is not taken (it would be generated); no mode at all is an error.
    records[0]["modes"].pop("ar")
    path.write_text(json.dumps({"questions": records}))
    assert set(quality.answers_from_latency(str(path), questions)) == {"apar"}
    for r in records:
        r["modes"] = {"sot": {"text": "x"}}
    path.write_text(json.dumps({"questions": records}))
    with pytest.raises(ValueError, match="has answers of none of"):
        quality.answers_from_latency(str(path), questions)


def test_quality_compares_apar_with_the_same_models_sampled_ar_answers(tiny_dir, tmp_path):
    questions = select(load_suite("starter"), limit=3)

    def answers(modes):
        return quality.generate_answers(questions, str(tiny_dir), None, str(tiny_dir), "float32", 1, 16, modes)

    got = answers(("apar", "ar", "ar-sampled"))
    result = quality.run_quality(questions, got, {}, str(tiny_dir), threads=1)
    assert set(result["metrics"]) == {"apar", "ar", "ar-sampled"}
    assert set(result["delta_pct_sampled"]) == set(quality.DELTA_METRICS)
    sampled = [a["text"] for a in got["ar-sampled"]]
    assert sampled != [a["text"] for a in got["ar"]]  # drawn at T=0.7, not greedy
    assert [a["text"] for a in answers(("ar-sampled",))["ar-sampled"]] == sampled  # seeded per question


def test_quality_scores_a_latency_run_of_apar_and_its_unguarded_mode_alone(tiny_dir, tmp_path):
    # The before/after run of the answer guards: `bench latency --modes apar,serial,apar-unguarded,...`.
    questions = select(load_suite("starter"), limit=2)
    records = [{"id": q["id"], "modes": {"apar": {"text": f"1. A{i}\n2. B{i}", "threads": 3, "cut": False},
                                         "serial": {"text": f"1. A{i}\n2. B{i}", "threads": 3, "cut": False},
                                         "apar-unguarded": {"text": f"1. A{i}\n2. A{i}", "threads": 3, "cut": True}}}
               for i, q in enumerate(questions)]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"questions": records}))
    result = quality.run(_args(tiny_dir, tmp_path, limit=2, answers=str(path), modes="apar,apar-unguarded", plot=None))
    m = result["metrics"]
    assert set(m) == {"apar", "apar-unguarded"} and m["apar"]["cut"] == 0 and m["apar-unguarded"]["cut"] == 1
    assert m["apar-unguarded"]["repeated_head"] == 1 and "delta_pct_guards" in result


def test_quality_scores_the_unguarded_answers_and_the_base_mode_of_a_latency_run(tiny_dir, tmp_path):
    questions = select(load_suite("starter"), limit=2)
    records = [{"id": q["id"], "modes": {
        "apar": {"text": f"1. A{i}\n2. B{i}", "threads": 3 - 2 * i, "cut": i == 1}, "ar": {"text": f"Short {i}.", "threads": 1},
        "hf": {"text": "from hf"},
        "base": {"text": f"base {i}"}, "apar-unguarded": {"text": f"1. A{i}\n2. A{i}\n3. A{i}"},
    }} for i, q in enumerate(questions)]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"questions": records}))
    answers = quality.answers_from_latency(str(path), questions)
    assert [a["text"] for a in answers["base"]] == ["base 0", "base 1"]  # the engine's base mode before HF's
    result = quality.run_quality(questions, answers, {}, str(tiny_dir), threads=1)
    m, d = result["metrics"], result["delta_pct_guards"]
    assert set(m) == {"apar", "ar", "base", "apar-unguarded"} and "delta_pct_guards" in result["per_category"]["generic"]
    assert d["list_items"] == pytest.approx(100 * (2 - 3) / 3)
    # How the runs went: question 0's APAR answer forks (3 threads), question 1's does not (1) and is cut.
    assert m["apar"]["fork"] == 0.5 and m["apar"]["cut"] == 0.5 and m["apar"]["threads"] == 2
    assert [q["modes"]["ar"]["early_stop"] for q in result["questions"]] == [True, False]
    assert m["apar-unguarded"]["repeated_head"] == 1 and m["apar"]["repeated_head"] == 0
    assert m["base"]["fork"] is None  # unknown: the latency record had no thread count
    assert result["ar_vs_base_tokens"] == pytest.approx(m["ar"]["tokens"] / m["base"]["tokens"])
    assert d["nll"] == pytest.approx(100 * (m["apar"]["nll"] - m["apar-unguarded"]["nll"]) / m["apar-unguarded"]["nll"])
    quality.print_table(result)


def test_quality_generates_the_modes_asked_for_with_the_penalties_given(tiny_dir, tmp_path):
    args = _args(tiny_dir, tmp_path, limit=2, max_tokens=30, answers=None, modes="apar,apar-unguarded",
                 frequency_penalty=1.5, presence_penalty=0.0, repetition_penalty=1.0, plot=None)
    result = quality.run(args)
    assert set(result["metrics"]) == {"apar", "apar-unguarded"}  # only what was asked for
    assert result["config"]["penalties"]["frequency_penalty"] == 1.5 and "delta_pct_guards" in result
    assert "delta_pct" not in result and "ar_vs_base_tokens" not in result
    texts = {m: [q["modes"][m]["text"] for q in result["questions"]] for m in ("apar", "apar-unguarded")}
    assert texts["apar"] != texts["apar-unguarded"]  # the penalty reached the guarded mode only
    base = quality.run(_args(tiny_dir, tmp_path, limit=2, max_tokens=30, answers=None, modes="base", plot=None))
    assert [q["modes"]["base"]["text"] for q in base["questions"]] == texts["apar-unguarded"]  # tiny: tuned == base
    with pytest.raises(ValueError, match="--modes takes"):
        quality.run(_args(tiny_dir, tmp_path, limit=2, answers=None, modes="apar,turbo"))


def test_quality_reuses_the_base_answers_of_an_earlier_run_only_under_the_same_settings(tiny_dir, tmp_path, monkeypatch):
    first = quality.run(_args(tiny_dir, tmp_path, limit=2, max_tokens=20, answers=None, modes="base", plot=None))
    earlier = tmp_path / "earlier.json"
    (tmp_path / "out.json").rename(earlier)
    texts = [q["modes"]["base"]["text"] for q in first["questions"]]
    generated = []
    real = quality.generate_answers
    monkeypatch.setattr(quality, "generate_answers", lambda qs, *a, **k: generated.append(a[6]) or real(qs, *a, **k))
    again = quality.run(_args(tiny_dir, tmp_path, limit=2, max_tokens=20, answers=None, modes="apar,base",
                              base_answers=str(earlier), plot=None))
    assert generated == [("apar",)]  # only the tuned mode was generated; base came from the earlier run
    assert [q["modes"]["base"]["text"] for q in again["questions"]] == texts
    assert again["config"]["base_answers_from"] == str(earlier) and again["config"]["generated_modes"] == ["apar"]
    # Other settings would have given other answers: refused, as is a run that does not score base.
    with pytest.raises(ValueError, match="max_tokens 20"):
        quality.run(_args(tiny_dir, tmp_path, limit=2, max_tokens=30, answers=None, modes="base", base_answers=str(earlier)))
    with pytest.raises(ValueError, match="base model"):
        quality.run(_args(tiny_dir, tmp_path, limit=2, max_tokens=20, answers=None, modes="base", base_model="other",
                          base_answers=str(earlier)))
    with pytest.raises(ValueError, match="does not ask for base"):
        quality.run(_args(tiny_dir, tmp_path, limit=2, max_tokens=20, answers=None, modes="apar", base_answers=str(earlier)))
