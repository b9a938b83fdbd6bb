"""Recounts the shipped head's held-out figures with draft/train.py's `held_out_figures` as it is now,
on the data it was trained from (not in the repository: `parafork train-draft` writes it), and writes
them into the head's card (config.json), the former ones kept under `held_out_before_recount`.

    python results/eagle/recount_card.py /work/eagle/data

Written when `evaluate` began counting labels outside the draft vocabulary as misses (it had left
those positions out) and reading what sampling at temperature 1.0 keeps of a first draft token."""
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from parafork.draft.head import EagleHead
from parafork.draft.train import DraftTrainConfig, held_out_figures, load_sequences
from parafork.llm import LLM

folder = Path(__file__).resolve().parents[2] / "parafork" / "adapters" / "smollm2-apar-eagle"
torch.set_num_threads(2)
head = EagleHead.load(folder)
card = head.config.card
cfg = DraftTrainConfig(**{f.name: card["train"][f.name] for f in fields(DraftTrainConfig) if f.name in card["train"]})
cfg.data = sys.argv[1]
shards, seqs, _ = load_sequences(Path(cfg.data), cfg.held_out, cfg.max_len)
held = [q for q in seqs if q.held_out]
embed = LLM("bundled", dtype="float32", num_kv_blocks=16, step_cost="fixed").engine.runner.embed.float()
t2d_index = torch.full((embed.shape[0],), -100, dtype=torch.long)
t2d_index[head.draft_to_target] = torch.arange(len(head.draft_to_target))
figures = held_out_figures(head, shards, held, embed, t2d_index, cfg)
config = json.loads((folder / "config.json").read_text())
kept = config["parafork"]["card"]
kept["held_out_before_recount"] = kept.get("held_out_before_recount", kept["held_out"])
kept["held_out"] = figures
(folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
print(json.dumps({k: figures[k] for k in ("positions", "tokens_per_verify_step")}),
      json.dumps({k: {x: v for x, v in figures[k].items() if x != "calibration"} for k in ("greedy", "sampled")}))
