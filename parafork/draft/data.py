"""Self-distilled data for the draft head: the bundled model's own APAR answers, and the hidden
states parafork's runner computes for every token of them.

**Answers.** ShareGPT prompts (with their chat context: `data.own.prompts`, the same usable
exchanges data v3 answered, in their fixed shuffled order) are answered by the bundled model in
APAR mode through parafork's engine, in batches of `concurrency` requests; each prompt is
answered greedily or at the server's default temperature, 1.0 (`temperatures`, in turn), so
the head sees both kinds of text it will draft for.

**Hidden states.** Once a batch has finished, every answer tree is fed again through the
runner, thread by thread, each child forked off its parent's KV exactly at its `[Fork]` (the
engine's own fork: full blocks shared, the tail block copied), so every token of a tree is
computed once, with the positions and the visibility (a thread sees its ancestors up to its
fork, never a sibling) it had while decoding. `TorchRunner.forward_hidden` gives per token the
residual stream entering the head's three layers and the final normed state (from which the
target's next-token distribution is recomputed in training: 576 numbers instead of 49,152).
Requests whose threads joined are skipped (counted): their positions are not a thread's path.

**Files.** `shard-NNNNN.safetensors` per batch: `tokens` [N] int32, `aux` [N, 3h] and `final`
[N, h] bf16 (one row per tree token), `threads` [M, 6] int64, one row per thread: request
index in the shard, parent row (-1 for a root), own_start (its first own token's index in its
path), first fed position, first node row, nodes. `index.jsonl` gets one line per request
(key, temperature, shard, threads, tokens; `skipped` where it joined), written after its shard,
so a stopped run resumes where it was.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..engine.runner import SequenceSlice
from ..engine.thread import Request, Thread
from ..sampling import SamplingParams

LLM_OPTIONS: dict = {}  # more engine options (tests: float32 for a tiny model)


@dataclass
class HarvestConfig:
    out: str
    requests: int  # answers wanted in all (a resumed run counts what is there)
    model: str = "bundled"
    temperatures: tuple[float, ...] = (0.0, 1.0)  # greedy, and the server's default (OpenAI's 1.0)
    max_tokens: int = 512
    concurrency: int = 16
    num_kv_blocks: int = 4096
    cpu_threads: int = 2
    seed: int = 7  # which prompts, in which order (data.own.prompts' shuffle)


def thread_rows(request: Request) -> list[Thread]:
    """The request's threads, parents before children (birth order)."""
    return sorted(request.threads, key=lambda t: t.thread_id)


def teacher_force(llm, request: Request, layers: tuple[int, ...]) -> dict | None:
    """Feeds a finished request's tree again (see the module docstring); returns its tensors, or
    None if a thread joined. The engine must be idle: the tree's KV comes from its pool."""
    engine = llm.engine
    runner, bm, seq_ids = engine.runner, engine.block_manager, engine.scheduler.seq_ids
    threads = thread_rows(request)
    if any(t.joins for t in threads):
        return None
    shadow = Request(f"teacher-{request.request_id}", request.prompt_token_ids, SamplingParams(), arrival=-1)
    shadow.threads = []
    twin: dict[int, Thread] = {}
    rows: list[list[int]] = []
    pieces: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    chunk = engine.config.max_batch_tokens

    def feed(t: Thread, upto: int) -> None:
        s = twin[t.thread_id]
        while s.num_cached < upto:
            n = min(chunk, upto - s.num_cached)
            bm.allocate(s, s.num_cached + n)
            out = runner.forward_hidden([SequenceSlice(s.seq_id, t.token_ids[s.num_cached:s.num_cached + n],
                                                       s.num_cached, s.block_table)], layers)
            pieces[t.thread_id].append((out.aux, out.final))
            s.num_cached += n

    try:
        for t in threads:
            if t.parent is None:
                s = shadow.root
                s.token_ids = list(t.token_ids)
                s.seq_id = seq_ids.take()
            else:
                s = Thread(shadow, list(t.token_ids), t.own_start, depth=t.depth, parent=twin[t.parent.thread_id])
                shadow.threads.append(s)
            twin[t.thread_id] = s
            pieces[t.thread_id] = []
        # Parents first: each feeds up to a child's [Fork], forks it there, and goes on.
        for t in threads:
            s = twin[t.thread_id]
            if t.parent is not None:
                assert s.num_cached == t.own_start  # forked at its [Fork], nothing of its own yet
            for child in sorted((c for c in threads if c.parent is t), key=lambda c: c.own_start):
                feed(t, child.own_start)
                c = twin[child.thread_id]
                c.seq_id, copy = seq_ids.take(), bm.fork(s, c)
                runner.fork(s.seq_id, c.seq_id, copy)
                c.num_cached = child.own_start
            feed(t, len(t.token_ids))
        aux, final, tokens, offset = [], [], [], 0
        index = {t.thread_id: k for k, t in enumerate(threads)}
        for t in threads:
            first = 0 if t.parent is None else t.own_start
            n = len(t.token_ids) - first
            rows.append([-1 if t.parent is None else index[t.parent.thread_id], t.own_start, first, offset, n])
            aux += [a for a, _ in pieces[t.thread_id]]
            final += [f for _, f in pieces[t.thread_id]]
            tokens += t.token_ids[first:]
            offset += n
        return {"tokens": torch.tensor(tokens, dtype=torch.int32), "aux": torch.cat(aux).to(torch.bfloat16),
                "final": torch.cat(final).to(torch.bfloat16), "threads": torch.tensor(rows, dtype=torch.long)}
    finally:
        for s in [shadow.root, *shadow.threads]:
            bm.free(s)
            if s.seq_id is not None:
                seq_ids.give_back(s.seq_id)
                runner.release(s.seq_id)


def harvest(cfg: HarvestConfig, layers: tuple[int, ...], prompts: list[dict] | None = None) -> dict:
    """Answers and feeds prompts until `index.jsonl` lists `cfg.requests` requests; returns a
    summary. `prompts` (dicts with key, context, prompt) default to ShareGPT's."""
    from safetensors.torch import save_file

    from ..data.own import prompts as sharegpt_prompts, read_done
    from ..data.sharegpt import messages
    from ..llm import LLM

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.jsonl"
    meta_path, meta = out / "meta.json", {"model": cfg.model, "layers": list(layers), "max_tokens": cfg.max_tokens}
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise ValueError(f"{out} holds data of other settings ({meta_path.read_text().strip()}); use another folder")
    meta_path.write_text(json.dumps(meta) + "\n")
    done = read_done(index_path)
    shards = sorted(out.glob("shard-*.safetensors"))
    todo = [p for p in (prompts if prompts is not None else sharegpt_prompts(None, cfg.seed)) if p["key"] not in done]
    summary = {"requests": len(done), "this_run": 0, "tokens_this_run": 0, "skipped_joined": 0}
    if len(done) >= cfg.requests:
        return summary
    llm = LLM(cfg.model, cpu_threads=cfg.cpu_threads, num_kv_blocks=cfg.num_kv_blocks, **LLM_OPTIONS)
    bar = tqdm(total=cfg.requests, initial=len(done), desc="draft data", unit=" answer")
    start = time.perf_counter()
    with open(index_path, "a", encoding="utf-8") as index:
        while len(done) < cfg.requests and todo:
            n = min(cfg.concurrency, cfg.requests - len(done))
            batch, todo = todo[:n], todo[n:]
            requests = {}
            for k, record in enumerate(batch):
                temperature = cfg.temperatures[(len(done) + k) % len(cfg.temperatures)]
                params = SamplingParams(mode="apar", max_tokens=cfg.max_tokens,
                                        temperature=temperature,
                                        seed=len(done) + k)
                rid = llm.add_request(messages(record), params, stream=False)
                requests[rid] = (record, params.temperature, llm.engine.requests[rid])
            failed = []
            while llm.has_unfinished_requests():
                for output in llm.step():
                    if output.finished and output.error:
                        failed.append(f"{requests[output.request_id][0]['key']}: {output.error}")
            if failed:
                raise RuntimeError("; ".join(failed))
            parts, lines, rows, thread_base = [], [], 0, 0
            shard = out / f"shard-{len(shards):05d}.safetensors"
            for rid, (record, temperature, request) in requests.items():
                line = {"key": record["key"], "temperature": temperature, "shard": None, "threads": 0, "tokens": 0}
                data = teacher_force(llm, request, layers)
                if data is None:
                    summary["skipped_joined"] += 1
                    lines.append({**line, "skipped": "joined"})
                    continue
                t = data["threads"]  # parent row, own_start, first fed position, first node row, nodes
                t[:, 0] = torch.where(t[:, 0] >= 0, t[:, 0] + thread_base, -1)
                t[:, 3] += rows
                data["threads"] = torch.cat([torch.full((len(t), 1), len(parts)), t], 1)
                parts.append(data)
                rows += len(data["tokens"])
                thread_base += len(t)
                lines.append({**line, "shard": shard.name, "threads": len(t), "tokens": len(data["tokens"])})
            if parts:
                save_file({name: torch.cat([p[name] for p in parts]).contiguous()
                           for name in ("tokens", "aux", "final", "threads")}, str(shard))
                shards.append(shard)
            for line in lines:
                index.write(json.dumps(line) + "\n")
                done[line["key"]] = line
                summary["this_run"] += 1
                summary["tokens_this_run"] += line["tokens"]
            index.flush()
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{summary['tokens_this_run'] / (time.perf_counter() - start):.0f}")
            llm.check_idle()
    bar.close()
    summary["requests"] = len(done)
    summary["seconds_this_run"] = round(time.perf_counter() - start, 1)
    return summary
