"""`parafork bench driver`: APAR through the remote driver against plain AR through the same server.

Against `--url` (any OpenAI-compatible completion server that renders special tokens and
honours `logit_bias`), or, without it, parafork's own server started here on a loopback
port with `--model`. Each question runs three ways back to back: `apar` (threads'
requests in parallel), `serial` (the same tree, one request at a time: same answers, AR's
pace) and `ar` ([Fork] banned; a tuned model's answers are then shorter). Ratios are of
total wall time, tokens/s ratios beside them, with the driver's requests and threads.
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from .. import models
from ..export import gguf_for
from ..remote import RemoteAPAR
from .common import Checkpoint, add_output_args, add_suite_args, metadata, write_json
from .suite import load_suite, select


@contextmanager
def local_server(model: str, adapter: str | None, dtype: str, threads: int, backend: str = "auto",
                 quant: str | None = None, num_kv_blocks: int | None = None) -> Iterator[str]:
    """parafork's own server on a free loopback port, for as long as the block runs
    (`num_kv_blocks`: its KV pool; None: the engine's default)."""
    import uvicorn

    from ..llm import LLM
    from ..server import create_app

    pool = {} if num_kv_blocks is None else {"num_kv_blocks": num_kv_blocks}
    llm = LLM(model, adapter=adapter, dtype=dtype, cpu_threads=threads, backend=backend, quant=quant, **pool)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, model), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the local parafork server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def llamacpp_server(gguf, slots: int, threads: int, n_ctx: int = 8192) -> Iterator[str]:
    """llama.cpp's own server (llama-server, in-process through xllamacpp) on a free loopback
    port: `slots` parallel slots, continuous batching, for as long as the block runs."""
    import xllamacpp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_parallel = slots
    params.n_ctx = n_ctx  # shared by the slots
    params.cont_batching = True
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]
    params.port = port
    server = xllamacpp.Server(params)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        del server  # stops its main loop and frees the model


@contextmanager
def target_server(args) -> Iterator[tuple[str, str, str | None]]:
    """(URL, model id, API key) of `--url`, of llama.cpp's server (`--llamacpp-slots N`) on the
    GGUF of --model, or of parafork's own server, started for the block."""
    if args.url:
        yield args.url, args.served_name or args.model, args.api_key
    elif getattr(args, "llamacpp_slots", None):
        from ..config import EngineConfig

        config = EngineConfig(model=args.model, backend="llamacpp", quant=args.quant)
        path = models.resolve_model_path(args.model)
        adapter = Path(args.adapter) if args.adapter else models.default_adapter(args.model)
        with llamacpp_server(gguf_for(config, path, adapter), args.llamacpp_slots, args.cpu_threads) as url:
            yield url, "gguf", None
    else:
        with local_server(args.model, args.adapter, args.dtype, args.cpu_threads, args.backend, args.quant,
                          getattr(args, "kv_blocks", None)) as url:
            yield url, args.model, None


def add_server_args(p) -> None:
    add_suite_args(p)
    add_output_args(p, plot=False)
    p.add_argument("--url", default=None, help="server base URL (…/v1); default: start parafork's own")
    p.add_argument("--llamacpp-slots", type=int, default=None,
                   help="instead: start llama.cpp's own server (xllamacpp) with this many parallel slots on --model as GGUF")
    p.add_argument("--served-name", default=None, help="the model id the server knows (default: --model)")
    p.add_argument("--api-key", default=None)


def add_arguments(p) -> None:
    add_server_args(p)
    p.add_argument("--chunk", type=int, default=16, help="tokens per request of a thread that may fork")


MODES = ("apar", "serial", "ar")


def run_driver(url: str, served_name: str, tokenizer, questions: list[dict], max_tokens: int, chunk: int,
               api_key: str | None = None, checkpoint_to: str | None = None, server: str | None = None) -> dict:
    """`checkpoint_to`: the JSON path; finished questions are kept beside it to resume from.
    `server` names the server for the checkpoint (a local one gets a new port each run)."""
    driver = RemoteAPAR(url, served_name, tokenizer, api_key=api_key, chunk=chunk)
    driver.generate_ar("Hello", max_tokens=4)  # warm-up
    checkpoint = Checkpoint(checkpoint_to, {"server": server or url, "model": served_name, "max_tokens": max_tokens, "chunk": chunk})
    records = []
    for q in tqdm(questions, desc="driver", unit="question"):
        if not (record := checkpoint.get(q)):
            record = {
                **q,
                "apar": vars(driver.generate(q["prompt"], max_tokens=max_tokens)),
                "serial": vars(driver.generate(q["prompt"], max_tokens=max_tokens, parallel=False)),
                "ar": vars(driver.generate_ar(q["prompt"], max_tokens=max_tokens)),
            }
            checkpoint.add(record)
        records.append(record)
    checkpoint.finish()
    wall = {m: sum(r[m]["seconds"] for r in records) for m in MODES}
    tokens = {m: sum(len(tokenizer.encode(r[m]["text"], add_special_tokens=False)) for r in records) for m in MODES}
    forked = [r for r in records if r["apar"]["threads"] > 1]
    return {
        **{f"apar_vs_{m}": wall[m] / wall["apar"] for m in ("serial", "ar")},
        **{f"apar_vs_{m}_tok_s": (tokens["apar"] / wall["apar"]) / (tokens[m] / wall[m]) for m in ("serial", "ar")},
        "wall_s": wall,
        "answer_tokens": tokens,
        "fork_rate": len(forked) / len(records),
        "threads_mean": sum(r["apar"]["threads"] for r in records) / len(records),
        "requests_mean": sum(r["apar"]["requests"] for r in records) / len(records),
        "questions": records,
    }


def run(args) -> dict:
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    tokenizer, _ = models.load_tokenizer(models.resolve_model_path(args.model))
    with target_server(args) as (url, served_name, api_key):
        server = None if args.url else (f"llama.cpp server, {args.llamacpp_slots} slots: {args.model}" if
                                        getattr(args, "llamacpp_slots", None) else f"local parafork server: {args.model}")
        result = run_driver(url, served_name, tokenizer, questions, args.max_tokens, args.chunk, api_key, args.json, server)
    result.update(config={"url": args.url or server, "model": args.model, "suite": args.suite,
                          "max_tokens": args.max_tokens, "chunk": args.chunk}, **metadata(args.cpu_threads))
    print(
        f"driver over {result['config']['url']}: {len(questions)} questions, APAR forks in {result['fork_rate']:.0%} "
        f"({result['threads_mean']:.1f} threads, {result['requests_mean']:.1f} requests per answer)\n"
        f"wall time APAR {result['wall_s']['apar']:.1f} s, serial {result['wall_s']['serial']:.1f} s, "
        f"AR {result['wall_s']['ar']:.1f} s\n"
        f"APAR vs serial (same answers) {result['apar_vs_serial']:.2f}x; "
        f"APAR vs AR {result['apar_vs_ar']:.2f}x (tokens/s ratio {result['apar_vs_ar_tok_s']:.2f}x)"
    )
    write_json(result, args.json)
    return result
