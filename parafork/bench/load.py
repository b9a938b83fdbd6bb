"""`parafork bench load`: many streaming clients against an OpenAI-compatible server.

`--clients` clients each send `--requests-per-client` streamed chat completions, one after
another (closed loop), with the official `openai` client over real sockets. Against
`--url`, or without it parafork's own server on a loopback port. Per run: requests sent,
completed (a finish reason arrived), errors, lost (neither), answer tokens/s over the run,
latency and time to first token, mean/p50/p99.
"""
from __future__ import annotations

import threading
import time

from tqdm.auto import tqdm

from ..sampling import MODES
from .common import metadata, percentile, write_json
from .driver import add_server_args, target_server
from .suite import load_suite, select


def run_load(url: str, served_name: str, prompts: list[str], clients: int, requests_per_client: int,
             max_tokens: int, api_key: str | None = None, mode: str = "apar") -> dict:
    import openai

    records: list[dict] = []
    lock = threading.Lock()
    bar = tqdm(total=clients * requests_per_client, desc=f"load x{clients}", unit="request")

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=600)
        for n in range(requests_per_client):
            prompt = prompts[(k * requests_per_client + n) % len(prompts)]
            record = {"finish": None, "error": None, "tokens": 0, "ttft_s": None}
            start = time.perf_counter()
            try:
                stream = client.chat.completions.create(
                    model=served_name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"parafork": {"mode": mode}},
                )
                for chunk in stream:
                    if record["ttft_s"] is None and chunk.choices and chunk.choices[0].delta.content:
                        record["ttft_s"] = time.perf_counter() - start
                    if chunk.choices and chunk.choices[0].finish_reason:
                        record["finish"] = chunk.choices[0].finish_reason
                    if chunk.usage:
                        record["tokens"] = chunk.usage.completion_tokens
            except openai.APIError as e:
                record["error"] = f"{type(e).__name__}: {e}"
            record["latency_s"] = time.perf_counter() - start
            with lock:
                records.append(record)
                bar.update(1)

    start = time.perf_counter()
    workers = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    bar.close()
    done = [r for r in records if r["finish"]]
    errors = sum(r["error"] is not None for r in records)
    latencies = [r["latency_s"] for r in done] or [0.0]
    ttfts = [r["ttft_s"] for r in done if r["ttft_s"] is not None] or [0.0]
    return {
        "clients": clients,
        "requests": clients * requests_per_client,
        "completed": len(done),
        "errors": errors,
        "lost": clients * requests_per_client - len(done) - errors,
        "tokens": (tokens := sum(r["tokens"] for r in done)),
        "wall_s": wall,
        "tok_s": tokens / wall,
        **{f"latency_{k}": v for k, v in _stats(latencies).items()},
        **{f"ttft_{k}": v for k, v in _stats(ttfts).items()},
        "error_samples": [r["error"] for r in records if r["error"]][:5],
    }


def add_arguments(p) -> None:
    add_server_args(p)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=4, help="sent one after another")
    p.add_argument("--mode", default="apar", choices=[m for m in MODES if m != "raw"])


def _stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def run(args) -> dict:
    prompts = [q["prompt"] for q in select(load_suite(args.suite), args.limit, args.per_category)]
    figures = dict(clients=args.clients, requests_per_client=args.requests_per_client, max_tokens=args.max_tokens,
                   mode=args.mode)
    with target_server(args) as (url, served_name, api_key):
        result = run_load(url, served_name, prompts, api_key=api_key, **figures)
    result.update(config={"url": args.url or "local parafork server", "model": args.model, "suite": args.suite,
                          **figures}, **metadata(args.cpu_threads))
    print(
        f"{result['clients']} clients, {result['requests']} streamed requests: {result['completed']} completed, "
        f"{result['errors']} errors, {result['lost']} lost; {result['tok_s']:.1f} answer tok/s over {result['wall_s']:.1f} s\n"
        f"latency mean {result['latency_mean']:.2f} s, p50 {result['latency_p50']:.2f} s, p99 {result['latency_p99']:.2f} s; "
        f"first token p50 {result['ttft_p50']:.2f} s, p99 {result['ttft_p99']:.2f} s"
    )
    write_json(result, args.json)
    return result
