"""Training the draft head on self-distilled data (draft/data.py), resumable.

Each thread of each harvested answer tree is one training sequence: its path (the ancestors'
tokens up to its fork, then its own), the target's hidden states at every position, and the
tokens. The head is unrolled `ttt_steps` steps over all positions at once (`EagleHead.unroll`);
step j at position t is scored on the token the model actually wrote at t + j + 2, where that
token is the thread's own (the prompt and the ancestors' tokens are context, taught by the
threads that wrote them; a child's forced `[Child]` is never a label). Loss: cross-entropy over
the draft vocabulary, step j weighted 0.8^j (EAGLE-3's); a label outside the draft vocabulary
is left out of the loss and counts as a miss in the acceptance figures.

**Labels.** `labels="soft"` (default): the target's own next-token distribution at that
position, recomputed from the stored final states through its (tied) LM head over the draft
vocabulary, with the penalties the engine decodes with (the model's generation_config: the
bundled adapter's frequency penalty 0.3, over the answer tokens the thread has seen, control
tokens left out), so the penalized argmax, which a greedy verify accepts, is the distribution's
mode. Loss: cross-entropy against that distribution. A sampled answer (temperature 1.0) then
teaches the same function as a greedy one: its written tokens are draws, its distributions are
what a verify compares against. `labels="hard"`: the written tokens (the first runs: 800 answers,
held out 1.46 tokens per verify step, half of the labels draws at temperature 1.0).

**Draft vocabulary**: the `draft_vocab` most frequent label tokens of the training threads, the
control tokens and end tokens always in (fewer where the data holds fewer distinct tokens: the
card states both). **Initialisation**: `lm_head` from the target's (tied)
embedding rows of those tokens, so the head starts in the target's output space; the rest at
random. **Held out**: `held_out` of the requests (by key hash), never trained on; the card
reports their acceptance: per step j, the share of positions whose chain of j + 1 drafts all
match, and the mean tokens per verify step of a chain of `ttt_steps` (1 + the matched run),
over all answers and apart for the greedy ones (whose written tokens are what a greedy verify
accepts) and the sampled ones; and how the head's confidence in its first token (its top
probability) compares with how often that token is right (`calibration`, greedy answers).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .head import EagleHead, HeadConfig

STEP_WEIGHT = 0.8


@dataclass
class DraftTrainConfig:
    data: str  # a folder written by draft/data.py
    out: str
    model: str = "bundled"
    draft_vocab: int = 8192
    ttt_steps: int = 3
    epochs: float = 2.0
    lr: float = 1e-3
    batch_tokens: int = 4096  # padded tokens per optimizer step
    max_len: int = 1024  # longer paths are left out (counted)
    held_out: float = 0.05
    save_every: int = 50
    seed: int = 0
    cpu_threads: int = 2
    autocast: str = "auto"  # "bf16", "fp32"; auto: bf16 where the CPU computes it natively (1.7x a step here)
    init_head: str | None = None  # warm start from a head folder for the same model (its draft vocabulary kept)
    labels: str = "soft"  # the target's penalized distribution, or "hard": the written tokens


@dataclass
class Sequence:
    shard: int
    nodes: torch.Tensor  # node rows of the path, in position order
    first_label: int  # the first position whose token is a label
    held_out: bool
    answer_start: int = 0  # the first answer token's position (the prompt's length): penalties count from it
    temperature: float = 0.0  # the answer's


def _held_out(key: str, share: float) -> bool:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / 2**64 < share


def load_sequences(folder: Path, held_out: float, max_len: int) -> tuple[list[dict], list[Sequence], dict]:
    from safetensors.torch import load_file

    lines = [json.loads(x) for x in (folder / "index.jsonl").read_text().splitlines() if x.strip()]
    names = sorted({x["shard"] for x in lines if x.get("shard")})
    shards = [load_file(str(folder / name)) for name in names]
    keys: dict[tuple[str, int], tuple[str, float]] = {}
    for name in names:
        for k, x in enumerate(y for y in lines if y.get("shard") == name):
            keys[(name, k)] = (x["key"], x["temperature"])
    seqs, too_long = [], 0
    for s, (name, shard) in enumerate(zip(names, shards)):
        paths: dict[int, torch.Tensor] = {}
        roots: dict[int, int] = {}  # request -> its root's own_start (where the answer starts)
        for row, (req, parent, own_start, first, offset, n) in enumerate(shard["threads"].tolist()):
            own = torch.arange(offset, offset + n)
            path = own if parent < 0 else torch.cat([paths[parent][:own_start], own])
            paths[row] = path
            if parent < 0:
                roots[req] = own_start
            if len(path) > max_len:
                too_long += 1
                continue
            key, temperature = keys[(name, req)]
            seqs.append(Sequence(s, path, own_start + (0 if parent < 0 else 1), _held_out(key, held_out),
                                 roots[req], temperature))
    return shards, seqs, {"requests": len(lines), "threads": len(seqs), "too_long": too_long}


def draft_vocabulary(shards, seqs: list[Sequence], size: int, always: set[int]) -> list[int]:
    counts: Counter = Counter()
    for q in seqs:
        if not q.held_out:
            counts.update(shards[q.shard]["tokens"][q.nodes[q.first_label:]].tolist())
    ids = set(always)
    for token, _ in counts.most_common():
        if len(ids) >= size:
            break
        ids.add(token)
    return sorted(ids)


def batches(seqs: list[Sequence], batch_tokens: int, rng: random.Random) -> list[list[Sequence]]:
    """Threads of similar length together (little padding), batches in random order."""
    order = sorted(seqs, key=lambda q: len(q.nodes))
    out, cur = [], []
    for q in order:
        if cur and len(q.nodes) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(q)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


@dataclass
class SoftLabels:
    """What recomputes the target's distribution over the draft vocabulary from a final state:
    its LM head's rows of the draft tokens, and the penalties it decodes with."""

    lm_rows: torch.Tensor  # [draft vocab, h]
    penalized: torch.Tensor  # [draft vocab] bool: tokens the penalties count (not control tokens)
    frequency: float = 0.0
    presence: float = 0.0


def tensors(shards, batch: list[Sequence], embed: torch.Tensor, t2d_index: torch.Tensor, steps: int,
            soft: SoftLabels | None = None):
    """aux [B, T, 3h], embeds [B, T + steps - 1, h], labels [steps, B, T] (draft ids, -100: none),
    and with `soft` the target's log-probabilities [steps, B, T, draft vocab] (else None)."""
    L = max(len(q.nodes) for q in batch)
    T = L - 1
    B = len(batch)
    h3 = shards[0]["aux"].shape[1]
    aux = torch.zeros(B, T, h3)
    toks = torch.zeros(B, L + steps, dtype=torch.long)
    label_ok = torch.zeros(B, L + steps, dtype=torch.bool)
    for b, q in enumerate(batch):
        sh = shards[q.shard]
        n = len(q.nodes)
        aux[b, :n - 1] = sh["aux"][q.nodes[:-1]].float()
        toks[b, :n] = sh["tokens"][q.nodes].long()
        label_ok[b, q.first_label:n] = True
    embeds = embed[toks[:, 1:T + steps]].float()
    labels = []
    for j in range(steps):
        idx = torch.arange(T) + j + 2
        lab = t2d_index[toks[:, idx]]
        lab = torch.where(label_ok[:, idx], lab, torch.full_like(lab, -100))
        labels.append(lab)
    targets = None
    if soft is not None:
        # Position p's distribution is over the token at p + 1; step j at t is scored on t + j + 2.
        logits = _finals(shards, batch) @ soft.lm_rows.T  # [B, L, V]
        if soft.frequency or soft.presence:
            d = t2d_index[toks[:, :L]]
            answer = torch.stack([torch.arange(L) >= q.answer_start for q in batch]) & (d >= 0)
            answer &= soft.penalized[d.clamp(min=0)]
            seen = torch.zeros_like(logits).scatter_(2, d.clamp(min=0)[..., None], answer[..., None].float())
            counts = seen.cumsum(1)  # answer tokens up to and including p: the context p + 1 is sampled in
            logits -= soft.frequency * counts + soft.presence * (counts > 0).float()
        logp = torch.log_softmax(logits, -1)
        targets = torch.stack([logp[:, (torch.arange(T) + j + 1).clamp(max=L - 1)] for j in range(steps)])
    return aux, embeds, torch.stack(labels), targets


def train_head(cfg: DraftTrainConfig) -> dict:
    from .. import models
    from ..llm import LLM

    from ..config import cpu_has_fast_bf16

    if cfg.autocast not in ("auto", "bf16", "fp32"):
        raise ValueError(f"autocast must be auto, bf16 or fp32, got {cfg.autocast!r}")
    if cfg.labels not in ("soft", "hard"):
        raise ValueError(f"labels must be soft or hard, got {cfg.labels!r}")
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and cpu_has_fast_bf16())
    torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(cfg.model, dtype="float32", num_kv_blocks=16, step_cost="fixed")
    runner = llm.engine.runner
    embed = runner.embed.float()
    from transformers import LlamaConfig

    target_config = LlamaConfig.from_pretrained(models.resolve_model_path(llm.config.model))
    digest = models.adapter_digest(llm.adapter) if llm.adapter else ""
    shards, seqs, counts = load_sequences(Path(cfg.data), cfg.held_out, cfg.max_len)
    c = llm.control
    always = {c.fork_id, c.child_id, c.join_id, *c.eos_ids}
    start = EagleHead.load(cfg.init_head) if cfg.init_head else None
    if start is not None:  # a warm start keeps its vocabulary: more data may rank the tokens otherwise
        vocab = start.draft_to_target.tolist()
        if (asked := start.config.card.get("draft_vocab_asked", len(vocab))) != cfg.draft_vocab:
            raise ValueError(f"{cfg.init_head} was trained with draft_vocab={asked}, not {cfg.draft_vocab}: "
                             f"a warm start keeps its vocabulary")
        if missing := always - set(vocab):
            raise ValueError(f"{cfg.init_head}'s draft vocabulary lacks the control tokens {sorted(missing)}")
    else:
        vocab = draft_vocabulary(shards, seqs, cfg.draft_vocab, always)
    meta = json.loads((Path(cfg.data) / "meta.json").read_text())
    if meta["model"] != cfg.model:
        raise ValueError(f"{cfg.data} holds hidden states of model {meta['model']!r}, not {cfg.model!r}")
    head = EagleHead(HeadConfig.for_target(target_config, vocab_size=embed.shape[0], draft_vocab_size=len(vocab),
                                           aux_layers=tuple(meta["layers"]), target_digest=digest))
    head.set_vocabulary(vocab)
    with torch.no_grad():
        head.lm_head.weight.copy_(embed[head.draft_to_target])
    if start is not None:
        if start.config.target_digest != digest:
            raise ValueError(f"{cfg.init_head} was trained for another adapter (digest {start.config.target_digest[:12]!r})")
        if start.config.aux_layers != head.config.aux_layers:
            raise ValueError(f"{cfg.init_head} reads layers {start.config.aux_layers}, this data holds {head.config.aux_layers}")
        head.load_state_dict(start.state_dict())
    t2d_index = torch.full((embed.shape[0],), -100, dtype=torch.long)
    t2d_index[head.draft_to_target] = torch.arange(len(vocab))
    soft = soft_labels(llm, target_config, embed, head.draft_to_target) if cfg.labels == "soft" else None
    train = [q for q in seqs if not q.held_out]
    held = [q for q in seqs if q.held_out]
    rng = random.Random(cfg.seed)
    per_epoch = len(batches(train, cfg.batch_tokens, random.Random(0)))
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ckpt = out / "checkpoint.pt"
    step, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["vocab"] != vocab or state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was written for other data or settings; use another --out")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, seconds = state["step"], state["seconds"]
        rng.setstate(state["rng"])
    plan: list[list[Sequence]] = []
    while len(plan) < total:
        plan += batches(train, cfg.batch_tokens, random.Random(cfg.seed + len(plan)))
    resumed_at, losses = step, []
    bar = tqdm(total=total, initial=step, desc="draft head", unit=" step")
    start = time.perf_counter() - seconds
    head.train()
    if step < total and not train:
        raise ValueError(f"{cfg.data}: no training threads (all {len(seqs)} held out or too long)")
    while step < total:
        aux, embeds, labels, targets = tensors(shards, plan[step], embed, t2d_index, cfg.ttt_steps, soft)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = head.unroll(aux, embeds, cfg.ttt_steps)
            loss = 0.0
            for j, normed in enumerate(outs):
                # The LM head (most of the head's weights) only where there is a label: for soft
                # labels every thread's own position (the target's distribution is there even
                # where the written token is outside the draft vocabulary).
                keep = labels[j] != -100 if soft is None else _own(plan[step], labels.shape[-1], j)
                if keep.any():
                    logits = head.logits(normed[keep]).float()
                    if soft is None:
                        loss = loss + STEP_WEIGHT ** j * F.cross_entropy(logits, labels[j][keep])
                    else:
                        cross = -(targets[j][keep].exp() * torch.log_softmax(logits, -1)).sum(-1).mean()
                        loss = loss + STEP_WEIGHT ** j * cross
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.save_every == 0 or step == total:
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                        "seconds": time.perf_counter() - start, "rng": rng.getstate(), "vocab": vocab,
                        "config": asdict(cfg)}, ckpt)
    bar.close()
    seconds = time.perf_counter() - start
    figures = held_out_figures(head, shards, held, embed, t2d_index, cfg)
    coverage = _coverage(shards, held, t2d_index)
    head.config.card.update({
        "data": {**counts, "folder": str(cfg.data), "held_out_threads": len(held)},
        "draft_vocab": len(vocab), "draft_vocab_asked": cfg.draft_vocab, "held_out_label_coverage": coverage,
        "parameters_millions": round(sum(p.numel() for p in head.parameters()) / 1e6, 2),
        "train": {**asdict(cfg), "optimizer_steps": total, "hours": round(seconds / 3600, 3),
                  "resumed_at_step": resumed_at, "loss_first": losses[:5], "loss_last": losses[-5:]},
        "held_out": figures,
    })
    head.save(out / "head")
    (out / "card.json").write_text(json.dumps(head.config.card, indent=1) + "\n")
    return head.config.card


def soft_labels(llm, target_config, embed: torch.Tensor, draft_ids: torch.Tensor) -> SoftLabels:
    """The target's LM head rows of the draft tokens and the penalties its engine decodes with."""
    if not getattr(target_config, "tie_word_embeddings", False):
        raise ValueError("soft labels read the target's LM head from its input embeddings, which this model does "
                         "not tie to its output; use labels='hard'")
    defaults = llm.sampling_defaults
    if defaults.get("repetition_penalty") not in (None, 1, 1.0):
        raise ValueError("soft labels do not apply a repetition penalty; use labels='hard'")
    penalized = torch.ones(len(draft_ids), dtype=torch.bool)
    control = set(llm.control.ids)
    penalized[[i for i, t in enumerate(draft_ids.tolist()) if t in control]] = False
    return SoftLabels(embed[draft_ids].float(), penalized, defaults.get("frequency_penalty") or 0.0,
                      defaults.get("presence_penalty") or 0.0)


def _own(batch: list[Sequence], T: int, j: int) -> torch.Tensor:
    """[B, T]: the positions t whose step-j label (the token at t + j + 2) is the thread's own."""
    idx = torch.arange(T) + j + 2
    return torch.stack([(idx >= q.first_label) & (idx < len(q.nodes)) for q in batch])


def _coverage(shards, seqs: list[Sequence], t2d_index: torch.Tensor) -> float:
    inside = total = 0
    for q in seqs:
        toks = shards[q.shard]["tokens"][q.nodes[q.first_label:]].long()
        inside += int((t2d_index[toks] >= 0).sum())
        total += len(toks)
    return inside / max(1, total)


def held_out_figures(head: EagleHead, shards, held: list[Sequence], embed, t2d_index, cfg: DraftTrainConfig) -> dict:
    """The card's `held_out`: all held-out answers, then the greedy ones (with the calibration)
    and the sampled ones (with what sampling at temperature 1.0 keeps) apart."""
    figures = evaluate(head, shards, held, embed, t2d_index, cfg)
    figures["greedy"] = evaluate(head, shards, [q for q in held if q.temperature == 0], embed, t2d_index, cfg,
                                 calibrate=True)
    figures["sampled"] = evaluate(head, shards, [q for q in held if q.temperature != 0], embed, t2d_index, cfg,
                                  temperature=1.0)
    return figures


@torch.no_grad()
def evaluate(head: EagleHead, shards, seqs: list[Sequence], embed, t2d_index, cfg: DraftTrainConfig,
             calibrate: bool = False, temperature: float | None = None) -> dict:
    """Per step j: the share of labelled positions whose drafts 0..j all match the written tokens
    (a chain accepted that far; a label outside the draft vocabulary is a miss), and the mean
    tokens per verify step of a chain of all steps.
    `calibrate`: per band of the head's top probability at step 0, how often its token is right.
    `temperature`: also how often the first draft token would be kept at that temperature,
    against the target's own distribution p at the position (from the stored final states, over
    the whole vocabulary, no penalties): drawn from the head's q and settled by the
    speculative-sampling rule, sum(min(p, q)) (`kept_drawn`, what the engine does), and the
    head's most likely token kept with p of it (`kept_most_likely`, a point-mass draft)."""
    head.eval()
    steps = cfg.ttt_steps
    matched = [0] * steps
    positions = 0
    kept = torch.zeros(2, dtype=torch.float64)
    bands = torch.zeros(10, 3, dtype=torch.float64)  # confidence sum, right, positions
    outside = torch.where(t2d_index == -100, -1, t2d_index)  # labels outside the draft vocabulary: -1, never guessed
    for batch in batches(seqs, cfg.batch_tokens, random.Random(0)):
        aux, embeds, labels, _ = tensors(shards, batch, embed, outside, steps)
        outs = head.unroll(aux, embeds, steps)
        valid = labels[0] != -100
        if temperature is not None:
            kept += _kept(head, outs[0][valid], _finals(shards, batch)[:, 1:][valid], embed, temperature)
        run = torch.ones_like(valid)
        for j, normed in enumerate(outs):
            logits = head.logits(normed)
            guess = logits.argmax(-1)
            run = run & (guess == labels[j]) & (labels[j] != -100)
            matched[j] += int((run & valid).sum())
            if j == 0 and calibrate:
                top = torch.softmax(logits.float(), -1).amax(-1)[valid].double()
                band = (top * 10).long().clamp(max=9)
                right = (guess == labels[0])[valid].double()
                bands.index_add_(0, band, torch.stack([top, right, torch.ones_like(top)], 1))
        positions += int(valid.sum())
    head.train()
    share = [m / max(1, positions) for m in matched]
    out = {"positions": positions, "chain_accepted_share": [round(s, 4) for s in share],
           "tokens_per_verify_step": round(1 + sum(share), 4)}
    if calibrate:
        out["calibration"] = [{"confidence": round(c / n, 3), "right": round(r / n, 3), "positions": int(n)}
                              for c, r, n in bands.tolist() if n]
    if temperature is not None:
        out["first_token_kept"] = {"temperature": temperature, "kept_drawn": round(float(kept[0]) / max(1, positions), 4),
                                   "kept_most_likely": round(float(kept[1]) / max(1, positions), 4)}
    return out


def _finals(shards, batch: list[Sequence]) -> torch.Tensor:
    """The target's final (normed) states [B, L, hidden] of each sequence's nodes."""
    L = max(len(q.nodes) for q in batch)
    final = torch.zeros(len(batch), L, shards[0]["final"].shape[1])
    for b, q in enumerate(batch):
        final[b, :len(q.nodes)] = shards[q.shard]["final"][q.nodes].float()
    return final


def _kept(head: EagleHead, normed: torch.Tensor, final: torch.Tensor, embed: torch.Tensor, temperature: float,
          chunk: int = 256) -> torch.Tensor:
    """Summed over positions: sum(min(p, q)) and p(argmax q), with q the head's distribution from
    its step-0 outputs `normed` and p the target's from the final states of the next position."""
    total = torch.zeros(2, dtype=torch.float64)
    d2t = head.draft_to_target
    for start in range(0, len(normed), chunk):
        q = torch.softmax(head.logits(normed[start:start + chunk]).float() / temperature, -1)
        p = torch.softmax(final[start:start + chunk] @ embed.T / temperature, -1)[:, d2t]
        total[0] += float(torch.minimum(p, q).sum())
        total[1] += float(p.gather(1, q.argmax(-1, keepdim=True)).sum())
    return total
