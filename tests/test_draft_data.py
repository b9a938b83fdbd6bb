"""Self-distilled data for the draft head (draft/data.py): every token of an answer tree is fed
once, each thread on its ancestors' KV up to its fork, and the hidden states stored for it equal
HF's over that thread's own path (an independent oracle that sees nothing of the tree)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from parafork import models
from parafork.draft import data
from parafork.llm import LLM
from parafork.rules import ForceForks
from parafork.sampling import SamplingParams

LAYERS = (0, 1)


def _finished_tree(llm: LLM, rules):
    params = SamplingParams(max_tokens=120, mode="apar", logits_rules=rules, plan_budget=False, no_repeat_heads=False)
    rid = llm.add_request({"prompt_token_ids": list(range(400, 430))}, params, stream=False)
    request = llm.engine.requests[rid]
    while llm.has_unfinished_requests():
        llm.step()
    return request


def test_each_tree_token_once_with_the_hidden_states_of_its_threads_path(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=128, block_size=4, step_cost="fixed")
    # A depth-2 tree: the root forks twice, and a child forks again.
    force = ForceForks(llm.control, frozenset({3, 9}), child_tokens=12, root_tokens=16)
    request = _finished_tree(llm, [force])
    threads = data.thread_rows(request)
    assert len(threads) >= 3
    out = data.teacher_force(llm, request, LAYERS)
    llm.check_idle()  # every block and sequence id of the replay back in the pool
    tree_tokens = len(request.root.token_ids) + sum(len(t.token_ids) - t.own_start for t in threads[1:])
    assert len(out["tokens"]) == len(out["aux"]) == len(out["final"]) == tree_tokens
    hf = models.load_hf_model(models.resolve_model_path(str(tiny_dir)), llm.tokenizer, torch.float32)
    h = hf.config.hidden_size
    for row, t in zip(out["threads"].tolist(), threads):
        parent, own_start, first, offset, n = row
        assert (parent == -1) == (t.parent is None) and own_start == t.own_start and n == len(t.token_ids) - first
        assert out["tokens"][offset:offset + n].tolist() == t.token_ids[first:]
        with torch.no_grad():
            ref = hf(torch.tensor([t.token_ids]), output_hidden_states=True).hidden_states
        for k, layer in enumerate(LAYERS):
            torch.testing.assert_close(out["aux"][offset:offset + n, k * h:(k + 1) * h].float(),
                                       ref[layer][0, first:].to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out["final"][offset:offset + n].float(),
                                   ref[-1][0, first:].to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)


def test_harvest_writes_shards_resumes_and_refuses_nothing_silently(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LLM_OPTIONS", {"dtype": "float32", "block_size": 4, "step_cost": "fixed"})
    prompts = [{"key": f"p{k}", "context": [], "prompt": f"Name {k + 2} colours."} for k in range(5)]
    cfg = data.HarvestConfig(out=str(tmp_path), requests=3, model=str(tiny_dir), max_tokens=24, concurrency=2,
                             num_kv_blocks=128, cpu_threads=1)
    first = data.harvest(cfg, LAYERS, prompts)
    assert first["requests"] == 3 and first["this_run"] == 3
    lines = [json.loads(x) for x in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == ["p0", "p1", "p2"]
    assert [x["temperature"] for x in lines] == [0.0, 1.0, 0.0]  # greedy and sampled in turn
    shard = load_file(str(tmp_path / lines[0]["shard"]))
    total = sum(x["tokens"] for x in lines if x["shard"] == lines[0]["shard"])
    assert len(shard["tokens"]) == len(shard["aux"]) == total and shard["threads"].shape[1] == 6
    # Resumed with a larger count: only the missing requests are answered.
    again = data.harvest(data.HarvestConfig(**{**cfg.__dict__, "requests": 5}), LAYERS, prompts)
    assert again["this_run"] == 2 and again["requests"] == 5
    assert len((tmp_path / "index.jsonl").read_text().splitlines()) == 5
