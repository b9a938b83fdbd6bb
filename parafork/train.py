"""`parafork train`: LoRA fine-tuning on packed paragraph trees, on CPU, resumable.

Trains LoRA adapters on every linear layer plus only the embedding rows of the control tokens
`[Fork]`, `[Child]` and `[Join]` (peft's trainable tokens: no copy of the embedding matrix in
the adapter; a warm start keeps the rows its adapter trains), at `embed_lr_scale` times the
learning rate (they start as the mean row). Trees with joins pack with the engine's join
masks and positions (`data/samples.py`). One
packed tree per forward; gradients accumulate over `--accum` samples.

The mix: the (checked) trees in APAR form; a `flat_ratio` share of them again in flat form
(the same answer, no markers), so the model writes the whole answer when it may not fork;
plain answers at `plain_ratio` of the total. Logits are computed only where a token is
predicted (the prompt and context are read, not scored).

Every `--save-every` optimizer steps it writes `OUT/checkpoint/` (adapter, optimizer and
scheduler state, data position, loss log) and a loss plot; a new run with the same OUT
resumes from there, also on another CPU, device or compute dtype: parameters and optimizer
state are float32; bf16 is only autocast for the forward, on a GPU or where the CPU computes
it natively. A CUDA GPU is used when there is one (`device`); CPU training keeps working.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import models
from .config import cpu_has_fast_bf16
from .data.build import read_jsonl
from .data.extract import Node
from .data.sharegpt import messages
from .data.samples import IGNORE, PackedSample, ThreadTokens, pack, tree_threads

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    data: str  # folder written by `parafork data` (trees.jsonl, plain.jsonl)
    out: str
    model: str = "base"
    steps: int = 300  # optimizer steps
    accum: int = 8  # samples per optimizer step
    lr: float = 3e-4
    warmup: int = 10
    rank: int = 8
    plain_ratio: float = 0.25  # share of unstructured answers mixed in
    flat_ratio: float = 0.3  # share of trees that also appear in flat form (no markers)
    embed_lr_scale: float = 10.0  # learning rate of the [Fork]/[Child] rows, times lr
    init_adapter: str | None = None  # warm start: an adapter folder ("bundled": the shipped one)
    autocast: str = "auto"  # "auto": bf16 on a GPU or where the CPU computes it natively; "bf16"; "fp32"
    device: str = "auto"  # "auto": a CUDA GPU when there is one, else "cpu"
    max_len: int = 1024  # packed tokens; longer samples are skipped
    save_every: int = 10
    cpu_threads: int = 2  # torch CPU threads
    seed: int = 0


Row = tuple[list, Node, bool]  # (chat messages, tree, in APAR form)


def load_rows(cfg: TrainConfig) -> list[Row]:
    """Trees (checked.jsonl when the folder has been checked, else trees.jsonl), flat copies
    of a `flat_ratio` share of them, plain answers (plain.jsonl, then demoted.jsonl) at
    `plain_ratio` of the whole, in a fixed shuffled order. Encoded when used (`encode_row`):
    18k packed masks would not fit in memory."""
    folder = Path(cfg.data)
    checked = (folder / "checked.jsonl").exists()
    trees = read_jsonl(folder / ("checked.jsonl" if checked else "trees.jsonl"))
    if not checked:
        log.warning("%s has no checked.jsonl: training on unchecked trees (parafork data --check)", folder)
    plain = [r for name in ("plain.jsonl", "demoted.jsonl") if (folder / name).exists() for r in read_jsonl(folder / name)]
    flat = trees[: int(len(trees) * cfg.flat_ratio)]  # trees.jsonl is shuffled
    want_plain = int((len(trees) + len(flat)) * cfg.plain_ratio / max(1e-9, 1 - cfg.plain_ratio))
    rows = [(messages(r), Node.from_json(r["tree"]), True) for r in trees]
    rows += [(messages(r), Node([r["answer"]]), False) for r in flat]
    rows += [(messages(r), Node([r["answer"]]), True) for r in plain[:want_plain]]
    random.Random(cfg.seed).shuffle(rows)
    return rows


def encode_row(row: Row, tokenizer, control, max_len: int) -> PackedSample | None:
    """A row as one packed sample, or None when it is longer than `max_len` tokens."""
    chat, root, markers = row
    threads: list[ThreadTokens] = tree_threads(models.apply_chat_template(tokenizer, chat), root, tokenizer, control, markers)
    if not markers:
        threads[0].tokens.append(min(control.eos_ids))  # a flat answer still ends
    return pack(threads) if sum(len(t.tokens) for t in threads) <= max_len else None


def sample_loss(model, sample: PackedSample) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the sample's labelled tokens, and their count; logits only
    where a token is predicted."""
    device = next(model.parameters()).device
    where = (sample.labels != IGNORE).nonzero().flatten()
    logits = model(
        input_ids=sample.input_ids[None].to(device),
        position_ids=sample.position_ids[None].to(device),
        attention_mask=sample.attention_bias(torch.float32).to(device),
        logits_to_keep=where.to(device),
    ).logits[0]
    loss = F.cross_entropy(logits.float(), sample.labels[where].to(device), reduction="sum")
    return loss, len(where)


def build_model(cfg: TrainConfig, tokenizer, control):
    from peft import LoraConfig, get_peft_model

    base = models.load_hf_model(models.resolve_model_path(cfg.model), tokenizer, torch.float32)
    rank = cfg.rank
    if cfg.init_adapter:
        from peft import PeftModel

        folder = models.BUNDLED_ADAPTER if cfg.init_adapter == "bundled" else Path(cfg.init_adapter)
        saved = json.loads((folder / "adapter_config.json").read_text())
        if sorted(saved.get("trainable_token_indices") or []) == sorted(control.ids):
            return PeftModel.from_pretrained(base, str(folder), is_trainable=True)
        rank = saved["r"]  # an adapter from before a control token existed: grown below
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LORA_TARGETS,
        trainable_token_indices=list(control.ids),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    if cfg.init_adapter:
        _load_grown(model, folder, saved["trainable_token_indices"], list(control.ids))
    return model


def _load_grown(model, folder: Path, saved_ids: list[int], ids: list[int]) -> None:
    """Loads an adapter trained on fewer control tokens (v2 knew `[Fork]`/`[Child]`, not `[Join]`):
    its LoRA weights and its rows of the tokens it knew; a new token keeps its starting row
    (the mean row, `models.load_hf_model`) and trains from there."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(folder / "adapter_model.safetensors")
    current = get_peft_model_state_dict(model)
    for key, rows in list(weights.items()):
        if key.endswith("trainable_tokens_delta"):
            grown = current[key].clone()
            for i, token in enumerate(saved_ids):
                grown[ids.index(token)] = rows[i]
            weights[key] = grown
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{folder}: weights this model has no place for: {result.unexpected_keys[:3]}")


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: TrainConfig) -> dict:
    torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    tokenizer, control = models.load_tokenizer(models.resolve_model_path(cfg.model))
    rows = load_rows(cfg)
    if not rows:
        raise ValueError(f"no training data in {cfg.data}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    model = build_model(cfg, tokenizer, control).to(device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if "trainable_tokens" not in n]},
         {"params": [p for n, p in named if "trainable_tokens" in n], "lr": cfg.lr * cfg.embed_lr_scale}],
        lr=cfg.lr, weight_decay=0.0,
    )
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and (device.type == "cuda" or cpu_has_fast_bf16()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    state = {"step": 0, "cursor": 0, "log": [], "tokens": 0, "seconds": 0.0}
    if (ckpt / "state.json").exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=device))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True, map_location="cpu"))
        state = json.loads((ckpt / "state.json").read_text())
        print(f"resuming from step {state['step']}")
    model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", unit="step")
    while state["step"] < cfg.steps:
        start = time.perf_counter()
        total_loss, total_tokens = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        batch: list[PackedSample] = []
        misses = 0
        while len(batch) < cfg.accum:
            sample = encode_row(rows[state["cursor"] % len(rows)], tokenizer, control, cfg.max_len)
            state["cursor"] += 1
            misses = 0 if sample else misses + 1
            if misses > len(rows):
                raise ValueError(f"no training sample in {cfg.data} fits max_len={cfg.max_len}")
            if sample:
                batch.append(sample)
        labelled = sum(int((s.labels != IGNORE).sum()) for s in batch)
        for sample in batch:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = sample_loss(model, sample)
            (loss / labelled).backward()
            total_loss += loss.item()
            total_tokens += len(sample.input_ids)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["tokens"] += total_tokens
        state["seconds"] += time.perf_counter() - start
        state["log"].append({"step": state["step"], "loss": total_loss / labelled, "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{total_loss / labelled:.3f}", tok_s=f"{state['tokens'] / state['seconds']:.0f}")
        bar.update(1)
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            save_checkpoint(model, optimizer, scheduler, state, cfg, ckpt)
    bar.close()
    model.save_pretrained(out / "adapter", save_embedding_layers=False)
    defaults = decode_defaults(cfg, rows)
    (out / "adapter" / "generation_config.json").write_text(json.dumps(defaults, indent=2) + "\n")
    write_card(out / "adapter", cfg, state, len(rows), defaults)
    return state


def decode_defaults(cfg: TrainConfig, rows: list[Row]) -> dict:
    """What a request that leaves them unset decodes with (the adapter's generation_config.json,
    `models.sampling_defaults`): the warm-start adapter's defaults (its penalties were chosen by
    measurement), with `join` on when the trees taught `[Join]` and `max_depth` as deep as the
    deepest tree taught (2 at least): a model is not asked for forks it never learned, nor
    kept from those it did."""
    inherited = {}
    if cfg.init_adapter:
        folder = models.BUNDLED_ADAPTER if cfg.init_adapter == "bundled" else Path(cfg.init_adapter)
        inherited = models.sampling_defaults(folder)
    trees = [root for _, root, markers in rows if markers]
    return {**inherited, "join": any(t.num_joins() for t in trees), "max_depth": max([2] + [t.depth() for t in trees])}


def save_checkpoint(model, optimizer, scheduler, state: dict, cfg: TrainConfig, ckpt: Path) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_embedding_layers=False)  # only the [Fork]/[Child] rows, not 57 MB
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)  # the previous checkpoint stays whole until the new one is complete
    plot_loss(state["log"], ckpt.parent / "loss.png")


def plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
    window = 10  # one step is a handful of samples: show the trend too
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, color="#37a", alpha=0.35, label="per step")
    ax.plot(steps, smooth, color="#37a", label=f"mean of last {window}")
    ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_card(folder: Path, cfg: TrainConfig, state: dict, num_samples: int, defaults: dict) -> None:
    log = state["log"]
    first = sum(r["loss"] for r in log[:5]) / max(1, len(log[:5]))
    last = sum(r["loss"] for r in log[-5:]) / max(1, len(log[-5:]))
    (folder / "README.md").write_text(
        f"""# parafork APAR adapter for {cfg.model}

LoRA (rank {cfg.rank}, all linear layers) plus the control tokens' embedding rows.

- data: `{cfg.data}` ({num_samples} rows: trees, {cfg.flat_ratio:.0%} of them again in flat form, plain answers at {cfg.plain_ratio:.0%})
- steps: {state['step']} x {cfg.accum} samples, lr {cfg.lr} (warm-up {cfg.warmup}, cosine), {state['tokens']} tokens
- loss per answer token: {first:.3f} (first 5 steps) -> {last:.3f} (last 5 steps)
- speed: {state['tokens'] / max(state['seconds'], 1e-9):.0f} packed tokens/s on {cfg.cpu_threads} CPU threads
- decoding defaults (`generation_config.json`, for requests that leave them unset): {json.dumps(defaults)}
- command: `parafork train --data {cfg.data} --out {cfg.out} --steps {cfg.steps} --accum {cfg.accum} --lr {cfg.lr} --rank {cfg.rank} --flat-ratio {cfg.flat_ratio}{f" --init-adapter {cfg.init_adapter}" if cfg.init_adapter else ""}`
"""
    )
