"""A tiny training run on a tiny random model: loss falls, checkpoints resume, the adapter loads."""
import json

import pytest
import torch

from parafork import LLM, models
from parafork.data.extract import extract
from parafork.sampling import SamplingParams
from parafork.train import TrainConfig, train

ANSWERS = [
    "Here are tips:\n\n1. **Sleep early:** go to bed before eleven every night.\n"
    "2. **Drink water:** keep a glass beside you all through the day.\n"
    "3. **Walk daily:** thirty minutes outside lifts the mood a lot.",
    "The sea is vast and deep. It covers most of the planet and holds countless forms of life.\n\n"
    "Sailors have crossed it for millennia. They navigated by the stars before compasses existed.\n\n"
    "Today it faces new threats. Pollution and warming waters change its ecosystems quickly.",
]


def write_data(folder):
    folder.mkdir()
    with open(folder / "trees.jsonl", "w") as f:
        for i, answer in enumerate(ANSWERS):
            tree = extract(answer).root.to_json()
            f.write(json.dumps({"id": str(i), "prompt": f"question {i}", "answer": answer, "kind": "x", "tree": tree}) + "\n")
    (folder / "plain.jsonl").write_text(json.dumps({"id": "p", "prompt": "hi", "answer": "Hello! How can I help?"}) + "\n")


def test_tiny_run_lowers_loss_resumes_and_the_adapter_loads(tiny_dir, tmp_path):
    write_data(tmp_path / "data")
    cfg = TrainConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=str(tiny_dir),
        steps=16, accum=3, lr=3e-2, warmup=1, rank=4, plain_ratio=0.34, save_every=4, cpu_threads=1,
    )
    half = train(TrainConfig(**{**cfg.__dict__, "steps": 8}))
    assert half["step"] == 8 and (tmp_path / "run" / "checkpoint" / "optimizer.pt").is_file()
    state = train(cfg)  # resumes at step 8
    losses = [r["loss"] for r in state["log"]]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "README.md").read_text().count("loss per answer token") == 1
    assert (adapter / "adapter_model.safetensors").stat().st_size < 2_000_000  # no embedding copy
    tokenizer, control = models.load_tokenizer(tiny_dir)
    base = models.load_hf_model(tiny_dir, tokenizer)
    tuned = models.load_hf_model(tiny_dir, tokenizer, adapter=adapter)
    emb_b, emb_t = base.get_input_embeddings().weight, tuned.get_input_embeddings().weight
    assert not torch.equal(emb_b[control.fork_id], emb_t[control.fork_id])  # the new rows were trained
    assert torch.equal(emb_b[:control.fork_id], emb_t[:control.fork_id])  # and only those
    llm = LLM(str(tiny_dir), adapter=str(adapter), dtype="float32", num_kv_blocks=64, block_size=4)
    assert llm.generate("question 0", None)[0].finished
    # v2-style trees (no join, two levels): the adapter asks for what it learned, no more.
    assert llm.sampling_defaults == {"join": False, "max_depth": 2}


def test_an_adapter_asks_for_the_joins_and_depth_its_trees_taught_and_keeps_its_penalties(tmp_path):
    from parafork.data.extract import extract_groups
    from parafork.train import decode_defaults

    nested = ("Steps:\n\n1. **Plan:** decide what to do first.\n   - Goals on paper: write them all down.\n"
              "   - Order of goals: sort them by how much they matter.\n   - Focus on three: keep the top three for the week.\n"
              "2. **Act:** do the first task every morning.\n3. **Review:** look back at the week on Friday.\n\n"
              "In short, plan, act and review every single week.")
    root = extract_groups(nested).root
    assert root.depth() == 3 and root.num_joins() == 1
    flat = extract(ANSWERS[0]).root
    init = tmp_path / "init"
    init.mkdir()
    (init / "generation_config.json").write_text(json.dumps({"frequency_penalty": 0.3}))
    cfg = TrainConfig(data="-", out="-", init_adapter=str(init))
    assert decode_defaults(cfg, [([], root, True), ([], flat, True)]) == {
        "frequency_penalty": 0.3, "join": True, "max_depth": 3}
    # A tree in flat form teaches no fork: only trees in APAR form count.
    assert decode_defaults(cfg, [([], root, False), ([], flat, True)]) == {
        "frequency_penalty": 0.3, "join": False, "max_depth": 2}


@pytest.mark.model
def test_the_bundled_adapter_loads_offline_and_the_model_forks_by_itself(base_llm):
    from parafork.tokens import CHILD, FORK

    assert models.default_adapter("bundled") == models.BUNDLED_ADAPTER
    assert models.default_adapter("base") is None
    llm = LLM("bundled", dtype="float32", num_kv_blocks=512)
    assert llm.adapter == models.BUNDLED_ADAPTER
    prompt = "How can I improve my time management skills?"
    out = llm.generate(prompt, SamplingParams(max_tokens=400))[0]
    assert out.num_threads >= 3, "the tuned model should fork a list answer into threads"
    assert FORK not in out.text and CHILD not in out.text
    assert out.num_steps < out.num_generated_tokens / 2  # threads decode side by side
    untuned = base_llm.generate(prompt, SamplingParams(max_tokens=160))[0]  # a list by then
    assert untuned.num_threads == 1  # the base model has never seen [Fork]


def test_rows_mix_checked_trees_flat_copies_and_plain_answers(tiny_dir, tmp_path):
    from parafork.train import encode_row, load_rows

    write_data(tmp_path / "data")
    cfg = TrainConfig(data=str(tmp_path / "data"), out="unused", model=str(tiny_dir), flat_ratio=0.5, plain_ratio=0.25)
    rows = load_rows(cfg)  # unchecked: trees.jsonl
    assert sum(1 for _, _, apar in rows if not apar) == 1  # half of the 2 trees again in flat form
    assert sum(1 for _, root, apar in rows if apar and not root.children) == 1  # plain: 3 rows x 1/3
    tokenizer, control = models.load_tokenizer(tiny_dir)
    flat = next(r for r in rows if not r[2])
    sample = encode_row(flat, tokenizer, control, 1024)
    ids = sample.input_ids.tolist()
    assert control.fork_id not in ids and control.child_id not in ids and len(sample.threads) == 1
    assert ids[-1] in control.eos_ids and tokenizer.decode(ids).count(flat[1].text()) == 1
    assert encode_row(flat, tokenizer, control, 10) is None  # too long for max_len
    # A checked folder trains on checked.jsonl; demoted answers join the plain ones.
    (tmp_path / "data" / "checked.jsonl").write_text((tmp_path / "data" / "trees.jsonl").read_text().splitlines()[0] + "\n")
    (tmp_path / "data" / "demoted.jsonl").write_text(json.dumps({"prompt": "d", "answer": "demoted answer"}) + "\n")
    rows = load_rows(TrainConfig(**{**cfg.__dict__, "flat_ratio": 1.0, "plain_ratio": 0.5}))
    assert sum(1 for _, root, apar in rows if apar and root.children) == 1
    assert sorted(root.text() for _, root, apar in rows if apar and not root.children) == ["Hello! How can I help?", "demoted answer"]


def test_a_run_resumes_from_a_checkpoint_written_under_another_compute_dtype(tiny_dir, tmp_path):
    write_data(tmp_path / "data")
    cfg = TrainConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=str(tiny_dir),
        steps=4, accum=2, lr=1e-2, warmup=1, rank=4, save_every=1, cpu_threads=1, autocast="bf16",
    )
    train(TrainConfig(**{**cfg.__dict__, "steps": 2}))  # bf16 autocast (emulated where not native)
    state = train(TrainConfig(**{**cfg.__dict__, "autocast": "fp32"}))
    assert state["step"] == 4 and [r["step"] for r in state["log"]] == [1, 2, 3, 4]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def _trained_briefly(tiny_dir, tmp_path) -> TrainConfig:
    """Two steps of training on a tiny data folder; the adapter lands in tmp_path/run/adapter."""
    write_data(tmp_path / "data")
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=str(tiny_dir),
                      steps=2, accum=2, lr=1e-2, warmup=1, rank=4, cpu_threads=1)
    train(cfg)
    return cfg


def test_warm_start_from_an_adapter_keeps_its_weights_at_step_zero(tiny_dir, tmp_path):
    from parafork.train import build_model

    cfg = _trained_briefly(tiny_dir, tmp_path)
    tokenizer, control = models.load_tokenizer(tiny_dir)
    warm = build_model(TrainConfig(**{**cfg.__dict__, "init_adapter": str(tmp_path / "run" / "adapter")}), tokenizer, control)
    trained = {n: p for n, p in warm.named_parameters() if p.requires_grad}
    assert any("trainable_tokens" in n for n in trained) and any("lora_A" in n for n in trained)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # it learned something...
    loaded = [p for n, p in trained.items() if "lora_B" in n]
    assert sum(float(p.detach().abs().sum()) for p in loaded) == pytest.approx(sum(float(v.abs().sum()) for v in lora_b))  # ...kept


def test_warm_start_from_an_adapter_without_join_grows_the_join_row(tiny_dir, tmp_path):
    """v2's adapter trained the [Fork]/[Child] rows only; v3 starts from it and trains [Join] too."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from parafork.train import build_model

    cfg = _trained_briefly(tiny_dir, tmp_path)
    tokenizer, control = models.load_tokenizer(tiny_dir)
    old = tmp_path / "run" / "adapter"  # made into an adapter of two rows, as v2's
    config = json.loads((old / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [control.fork_id, control.child_id]
    (old / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(old / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("trainable_tokens_delta"))
    weights[key] = weights[key][:2] + 0.5  # rows unlike the mean row
    save_file(weights, old / "adapter_model.safetensors")

    warm = build_model(TrainConfig(**{**cfg.__dict__, "init_adapter": str(old)}), tokenizer, control)
    state = get_peft_model_state_dict(warm)
    rows = state[key]
    assert rows.shape[0] == 3 and list(control.ids)[2] == control.join_id
    assert torch.equal(rows[:2], weights[key])  # [Fork], [Child] as trained
    start = models.load_hf_model(tiny_dir, tokenizer).get_input_embeddings().weight[control.join_id]
    assert torch.allclose(rows[2], start)  # [Join] starts where a fresh model has it (the mean row)
    lora = [k for k in weights if "lora_B" in k]
    assert lora and all(torch.equal(state[k], weights[k]) for k in lora)
