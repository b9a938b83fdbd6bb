"""`parafork bench soak`: bounded random load on an OpenAI-compatible server, for minutes.

`--clients` clients loop until `--minutes` have passed, each sending, with the official
`openai` client over real sockets, a random request from a fixed seed:
- an answer: chat or text completion, streamed or not, random `max_tokens`, mode, `stop`, `n`,
  penalties and `logprobs`; it must end with a finish reason on every choice;
- a cancel: a streamed answer the client closes after a few chunks (a disconnect);
- a bad input (negative temperature, `n` too large, an unknown field, empty messages, a
  wrong model): it must be refused with a 4xx.

Reported: requests by kind, errors by kind, **lost** (an answer with neither a complete
reply nor an error), bad inputs that were accepted, answer tokens/s, latency, the server
process's RSS over time (parafork's own in-process server only) and the KV pool and sequence
ids at the end from `/metrics` (everything free once the clients stop).
"""
from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import Counter

from tqdm.auto import tqdm

from .common import metadata, percentile, pyplot, save_figure, write_json
from .driver import add_server_args, target_server
from .suite import load_suite, select
from ..server import read_metrics

KINDS = {"answer": 0.75, "cancel": 0.1, "bad": 0.15}
STOPS = ["\n\n", ".", "2.", "However", "###"]
BAD = {
    "negative temperature": {"temperature": -1.0},
    "n too large": {"n": 99},
    "unknown field": {"extra_body": {"beam_width": 4}},
    "empty messages": {"messages": []},
    "wrong model": {"model": "no-such-model"},
}


def _answer_args(rng: random.Random, prompt: str, served_name: str, chat: bool) -> dict:
    args = {"model": served_name, "max_tokens": rng.choice([16, 64, 128, 256]), "temperature": rng.choice([0.0, 0.7]),
            "seed": rng.randrange(1000), "extra_body": {"parafork": {"mode": rng.choice(["apar", "apar", "serial", "ar"])}}}
    if chat:
        args["messages"] = [{"role": "user", "content": prompt}]
    else:
        args["prompt"] = prompt
    if rng.random() < 0.3:
        args["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.2:
        args["n"] = rng.randint(2, 3)
    if rng.random() < 0.3:
        args["frequency_penalty"], args["presence_penalty"] = rng.uniform(0, 1), rng.uniform(0, 0.5)
    if rng.random() < 0.2:
        if chat:
            args["logprobs"], args["top_logprobs"] = True, rng.randint(0, 3)
        else:
            args["logprobs"] = rng.randint(0, 3)
    return args


def _send(client, rng: random.Random, kind: str, prompt: str, served_name: str) -> dict:
    """One request; returns its record (kind, outcome, tokens)."""
    import openai

    chat = kind == "bad" or rng.random() < 0.7
    stream = kind == "cancel" or rng.random() < 0.5
    args = _answer_args(rng, prompt, served_name, chat)
    record = {"kind": kind, "outcome": None, "tokens": 0, "bad": None, "choices": args.get("n", 1)}
    if kind == "bad":
        record["bad"] = rng.choice(list(BAD))
        change = BAD[record["bad"]]
        args = {**args, **change, "extra_body": {**args["extra_body"], **change.get("extra_body", {})}}
    create = client.chat.completions.create if chat else client.completions.create
    try:
        if not stream:
            reply = create(**args)
            done = all(c.finish_reason for c in reply.choices) and len(reply.choices) == args.get("n", 1)
            record["outcome"] = "complete" if done else "incomplete"
            record["tokens"] = reply.usage.completion_tokens if reply.usage else 0
        else:
            finished: set[int] = set()
            chunks = 0
            with create(**args, stream=True, stream_options={"include_usage": True}) as events:
                for chunk in events:
                    chunks += 1
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            finished.add(choice.index)
                    if chunk.usage:
                        record["tokens"] = chunk.usage.completion_tokens
                    if kind == "cancel" and chunks >= 3:
                        break  # leaving the block closes the connection: the server must abort the request
            if kind == "cancel":
                record["outcome"] = "cancelled"
            else:
                record["outcome"] = "complete" if len(finished) == args.get("n", 1) else "incomplete"
    except openai.APIStatusError as e:
        record["outcome"] = f"HTTP {e.status_code}"
    except openai.APIError as e:
        record["outcome"] = type(e).__name__
    return record


def run_soak(url: str, served_name: str, prompts: list[str], clients: int, minutes: float, api_key: str | None = None,
             seed: int = 0, rss=None) -> dict:
    """`rss`: a callable giving the server's resident memory in MiB (None: not sampled)."""
    import openai

    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60 * minutes
    start = time.monotonic()
    bar = tqdm(desc=f"soak x{clients}", unit="request")

    def client_loop(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=600)
        while time.monotonic() < deadline:
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            begin = time.monotonic()
            record = _send(client, rng, kind, rng.choice(prompts), served_name)
            record["latency_s"] = time.monotonic() - begin
            with lock:
                records.append(record)
                bar.update(1)

    workers = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(clients)]
    for w in workers:
        w.start()
    samples = []
    while any(w.is_alive() for w in workers):
        if rss is not None:
            samples.append((round(time.monotonic() - start, 1), rss()))
        for w in workers:
            w.join(timeout=5.0 / len(workers))
    wall = time.monotonic() - start
    bar.close()
    if rss is not None:
        samples.append((round(wall, 1), rss()))
    return summarize(records, wall, samples, pool_at_end(url), clients, minutes)


def pool_at_end(url: str) -> dict:
    """The server's `/metrics` once the clients have stopped (waits up to 30 s for the engine to drain)."""
    base = url.removesuffix("/v1")
    values: dict = {}
    for _ in range(60):
        try:
            text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        except OSError:
            return {}
        values = read_metrics(text)
        if not values.get("parafork:num_requests_running") and not values.get("parafork:num_requests_waiting") \
                and not values.get("parafork:kv_blocks_used"):
            break
        time.sleep(0.5)
    return values


def summarize(records: list[dict], wall: float, rss: list, metrics: dict, clients: int, minutes: float) -> dict:
    answers = [r for r in records if r["kind"] == "answer"]
    bad = [r for r in records if r["kind"] == "bad"]
    latencies = [r["latency_s"] for r in answers if r["outcome"] == "complete"] or [0.0]
    errors = Counter(r["outcome"] for r in answers if r["outcome"] not in ("complete", "incomplete"))
    after_warmup = [m for t, m in rss if t >= 0.2 * wall]
    return {
        "clients": clients,
        "minutes": minutes,
        "requests": len(records),
        "by_kind": dict(Counter(r["kind"] for r in records)),
        "answers_complete": sum(r["outcome"] == "complete" for r in answers),
        "errors": dict(errors),
        "lost": sum(r["outcome"] == "incomplete" for r in answers),
        "bad_refused": sum(r["outcome"].startswith("HTTP 4") for r in bad),
        "bad_accepted": [r["bad"] for r in bad if not r["outcome"].startswith("HTTP 4")],
        "cancelled": sum(r["outcome"] == "cancelled" for r in records),
        # Engine requests (each choice of n is one): what the server's per-request histograms count.
        "choices_complete": sum(r["choices"] for r in answers if r["outcome"] == "complete"),
        "choices_cancelled": sum(r["choices"] for r in records if r["outcome"] == "cancelled"),
        "tokens": (tokens := sum(r["tokens"] for r in answers)),
        "wall_s": wall,
        "tok_s": tokens / wall if wall else 0.0,
        "latency_p50": percentile(latencies, 50),
        "latency_p99": percentile(latencies, 99),
        "rss_mib": rss,
        "rss_growth_after_warmup": (after_warmup[-1] / after_warmup[0] - 1) if len(after_warmup) > 1 else None,
        "kv_blocks_used_at_end": metrics.get("parafork:kv_blocks_used"),
        "sequences_live_at_end": metrics.get("parafork:num_sequences_live"),
        "requests_live_at_end": (metrics.get("parafork:num_requests_running", 0) + metrics.get("parafork:num_requests_waiting", 0)
                                 if metrics else None),
        "preemptions": metrics.get("parafork:preemptions_total"),
        "recomputed_tokens": metrics.get("parafork:recomputed_tokens_total"),
        "serialized_steps": metrics.get("parafork:serialized_steps_total"),
        "deferred_forks": metrics.get("parafork:deferred_forks_total"),
        # Every answered request is one observation of each per-request histogram.
        "e2e_latency_count": metrics.get("parafork:e2e_request_latency_seconds_count"),
        "ttft_count": metrics.get("parafork:time_to_first_token_seconds_count"),
    }


def add_arguments(p) -> None:
    add_server_args(p)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the clients' random choices")
    p.add_argument("--plot", default=None, help="write RSS over time (PNG) here")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="parafork's own server: its KV pool in blocks (a small one makes the load preempt)")


def _own_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run(args) -> dict:
    if args.kv_blocks is not None and (args.url or getattr(args, "llamacpp_slots", None)):
        raise ValueError("--kv-blocks sizes parafork's own server; it does not apply with --url or --llamacpp-slots")
    prompts = [q["prompt"] for q in select(load_suite(args.suite), args.limit, args.per_category)]
    with target_server(args) as (url, served_name, api_key):
        own = not args.url and not getattr(args, "llamacpp_slots", None)  # parafork's server runs in this process
        result = run_soak(url, served_name, prompts, args.clients, args.minutes, api_key, args.seed,
                          _own_rss_mib if own else None)
    result.update(config={"url": args.url or "local server", "model": args.model, "suite": args.suite,
                          "clients": args.clients, "minutes": args.minutes, "seed": args.seed, "kv_blocks": args.kv_blocks}, **metadata(args.cpu_threads))
    growth = result["rss_growth_after_warmup"]
    print(
        f"{result['clients']} clients for {result['wall_s'] / 60:.1f} min: {result['requests']} requests {result['by_kind']}\n"
        f"answers complete {result['answers_complete']}, errors {result['errors'] or 0}, LOST {result['lost']}, "
        f"cancelled {result['cancelled']}, bad inputs refused {result['bad_refused']}, accepted {result['bad_accepted'] or 0}\n"
        f"{result['tok_s']:.1f} answer tok/s; latency p50 {result['latency_p50']:.2f} s, p99 {result['latency_p99']:.2f} s; "
        f"RSS growth after warm-up {'-' if growth is None else f'{100 * growth:+.1f}%'}; at the end: "
        f"KV blocks used {result['kv_blocks_used_at_end']}, sequences live {result['sequences_live_at_end']}; "
        f"preemptions {result['preemptions']}, recomputed tokens {result['recomputed_tokens']}, "
        f"serialized request-steps {result['serialized_steps']}, deferred forks {result['deferred_forks']}"
    )
    if args.plot and result["rss_mib"]:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([t / 60 for t, _ in result["rss_mib"]], [m for _, m in result["rss_mib"]], color="#37a")
        ax.set(xlabel="minutes", ylabel="server RSS (MiB)", title=f"soak: {args.clients} clients")
        ax.set_ylim(bottom=0)
        save_figure(fig, args.plot)
    write_json(result, args.json)
    return result
