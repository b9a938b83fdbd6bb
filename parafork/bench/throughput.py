"""`parafork bench throughput`: batched AR against batched APAR under closed-loop load.

For each KV pool (pool size in blocks) and concurrency c, c clients each keep one
request in flight: when a request finishes, its client sends the next question of the
suite at once. Per run: answer tokens/s over the whole run and while every client was busy
(`closed_loop`), request latency mean/p50/p99,
the pool's peak KV blocks, preemptions, the tokens they made the engine feed again
(recomputed), the request-steps run serialized for lack of KV (scheduler.py) and the forks
deferred because rows were dear (engine.py). AR and
APAR run back to back on the same engine, same questions, same order (the paper's Fig. 5).
`--modes` picks them; `ar+spec` and `apar+spec` draft (`--spec ngram`, or `eagle`: a trained
head, `--draft-head`) and are compared with the same mode without drafts: what drafting gains
or costs when many threads share each step.

`--rounds N` runs every point N times, the modes' order reversed every other round (AR,
serial, APAR, then APAR, serial, AR, ...), and reports each figure as the mean over rounds
(the rounds' own figures kept in `per_round`). Why: these shared 2-core machines change
speed by 10-20% within minutes (AR alone at 64 clients read 668 and 550 tok/s in two runs ten
minutes apart on one Zen 4 machine), more than the modes differ at high load; a mode that
always runs last would carry the drift.
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..llm import LLM
from ..sampling import SamplingParams
from .common import add_output_args, add_suite_args, metadata, parse_list, percentile, pyplot, report, save_figure
from .suite import load_suite, select

MODES = ("ar", "serial", "apar")  # serial: APAR's own answers, one thread at a time
ALL_MODES = (*MODES, "ar+spec", "apar+spec")  # +spec: with drafts (--spec)


def add_arguments(p) -> None:
    add_suite_args(p)
    add_output_args(p)
    p.add_argument("--concurrency", default="1,4,16,64", help="comma list of client counts")
    p.add_argument("--kv-blocks", default="2048", help="comma list of KV pool sizes (blocks)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="run each point this many times, alternating the modes' order; figures are the means")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(ALL_MODES)}")
    p.add_argument("--spec", default=None, choices=["ngram", "eagle"], help="the +spec modes' drafts")
    p.add_argument("--draft-head", default=None, help="with --spec eagle: the head's folder (default 'bundled': the shipped one)")


def closed_loop(llm: LLM, prompts: list[str], concurrency: int, params: SamplingParams, bar: tqdm) -> dict:
    """Runs every prompt with `concurrency` clients; returns the run's figures.

    `tok_s` is answer tokens over the whole run, the drain included: once the queue is empty
    the last answers run with fewer than `concurrency` others, and with few requests a point
    is set by its slowest answer as much as by the step rate. `steady_tok_s` is the rate
    while every client had a request in flight (until the first completion that could not be
    replaced): the engine's generated tokens in that window (control tokens included) scaled
    by the run's share of answer tokens among generated ones."""
    queue = list(prompts)
    sent: dict[str, float] = {}
    latencies, tokens, generated, preemptions, recomputed, serialized, deferred, peak = [], 0, 0, 0, 0, 0, 0, 0
    generated_before = llm.engine.stats().generated_tokens_total
    window: tuple[float, int] | None = None  # (seconds, generated tokens) while every client was busy
    start = time.perf_counter()
    try:
        while queue or sent:
            while queue and len(sent) < concurrency:
                sent[llm.add_request(queue.pop(0), params, stream=False)] = time.perf_counter()
            if window is None and len(sent) < concurrency:
                window = (time.perf_counter() - start, llm.engine.stats().generated_tokens_total - generated_before)
            for out in llm.step():
                if out.finished and out.request_id in sent:
                    latencies.append(time.perf_counter() - sent.pop(out.request_id))
                    tokens += len(out.token_ids)
                    generated += out.num_generated_tokens
                    preemptions += out.num_preemptions
                    recomputed += out.num_recomputed_tokens
                    serialized += out.num_serialized_steps
                    deferred += out.num_deferred_forks
                    bar.update(1)
            peak = max(peak, llm.engine.block_manager.num_blocks - llm.engine.block_manager.num_free)
    finally:
        for request_id in sent:
            llm.abort(request_id)
    wall = time.perf_counter() - start
    window = window or (wall, generated)
    return {
        "requests": len(prompts),
        "completed": len(latencies),
        "tokens": tokens,
        "generated_tokens": generated,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "steady_s": window[0],
        "steady_tok_s": window[1] / window[0] * tokens / generated if window[0] > 0 and generated else 0.0,
        "latency_mean": sum(latencies) / len(latencies),
        "latency_p50": percentile(latencies, 50),
        "latency_p99": percentile(latencies, 99),
        "peak_kv_blocks": peak,
        "preemptions": preemptions,
        "recomputed_tokens": recomputed,
        "serialized_steps": serialized,
        "deferred_forks": deferred,
    }


def run_throughput(
    questions: list[dict],
    concurrency: list[int],
    kv_blocks: list[int],
    model: str = "bundled",
    adapter: str | None = None,
    dtype: str = "auto",
    threads: int = 2,
    max_tokens: int = 256,
    requests_per_client: int = 2,
    backend: str = "auto",
    quant: str | None = None,
    rounds: int = 1,
    modes: tuple[str, ...] = MODES,
    spec: str | None = None,
    draft_head: str = "bundled",
) -> dict:
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1 (got {rounds})")
    if unknown := [m for m in modes if m not in ALL_MODES]:
        raise ValueError(f"unknown modes {', '.join(unknown)}; choose from {', '.join(ALL_MODES)}")
    if any(m.endswith("+spec") for m in modes) != (spec is not None):
        raise ValueError("the +spec modes need --spec (ngram or eagle), and --spec needs a +spec mode")
    runs = []
    total = sum(c * requests_per_client for c in concurrency) * len(kv_blocks) * len(modes) * rounds
    with tqdm(total=total, desc="throughput", unit="request") as bar:
        for blocks in kv_blocks:
            # No prefix cache: the mode that runs first must not warm the questions for the others.
            llm = LLM(model, adapter=adapter, dtype=dtype, cpu_threads=threads, num_kv_blocks=blocks, prefix_caching=False,
                      backend=backend, quant=quant, **({"draft_head": draft_head} if spec == "eagle" else {}))
            llm.generate("Hello", SamplingParams(max_tokens=4))  # warm-up
            for c in concurrency:
                prompts = [questions[i % len(questions)]["prompt"] for i in range(c * requests_per_client)]
                per_round: dict[str, list[dict]] = {mode: [] for mode in modes}
                for k in range(rounds):
                    for mode in modes if k % 2 == 0 else modes[::-1]:
                        bar.set_postfix(kv=blocks, clients=c, mode=mode, round=k + 1)
                        params = SamplingParams(max_tokens=max_tokens, mode=mode.removesuffix("+spec"),
                                                speculative=spec if mode.endswith("+spec") else "off")
                        per_round[mode].append(closed_loop(llm, prompts, c, params, bar))
                for mode in modes:
                    runs.append({"mode": mode, "concurrency": c, "kv_blocks": blocks, **mean_figures(per_round[mode])})
            del llm
    return {
        "config": {"model": model, "adapter": adapter, "dtype": dtype, "threads": threads, "max_tokens": max_tokens,
                   "backend": backend, "quant": quant,
                   "concurrency": concurrency, "kv_blocks": kv_blocks, "requests_per_client": requests_per_client,
                   "rounds": rounds, "modes": list(modes), "spec": spec,
                   "draft_head": draft_head if spec == "eagle" else None},
        "runs": runs,
        "comparison": compare(runs),
        **metadata(threads),
    }


def mean_figures(rounds: list[dict]) -> dict:
    """One point's figures: the mean of each over its rounds (counts rounded), the rounds kept."""
    mean = {k: sum(r[k] for r in rounds) / len(rounds) for k in rounds[0]}
    for k in ("requests", "completed", "tokens", "generated_tokens", "peak_kv_blocks", "preemptions", "recomputed_tokens", "serialized_steps",
              "deferred_forks"):
        mean[k] = round(mean[k])
    if len(rounds) > 1:
        mean["per_round"] = rounds
    return mean


def compare(runs: list[dict]) -> list[dict]:
    """APAR against each baseline at each (KV pool, concurrency): throughput gain, KV share."""
    by_key = {(r["kv_blocks"], r["concurrency"], r["mode"]): r for r in runs}
    rows = []
    pairs = {"apar": ("ar", "serial"), "apar+spec": ("apar",), "ar+spec": ("ar",)}
    for (blocks, c, mode), apar in by_key.items():
        for baseline in pairs.get(mode, ()):
            base = by_key.get((blocks, c, baseline))
            if base is None:
                continue
            rows.append({
                "mode": mode,
                "baseline": baseline,
                "kv_blocks": blocks,
                "concurrency": c,
                "throughput_gain_pct": 100 * (apar["tok_s"] / base["tok_s"] - 1),
                "steady_gain_pct": 100 * (apar["steady_tok_s"] / base["steady_tok_s"] - 1) if base["steady_tok_s"] else None,
                # Round by round (each round ran both modes next to each other), with --rounds > 1.
                "throughput_gain_pct_rounds": [100 * (a["tok_s"] / b["tok_s"] - 1)
                                               for a, b in zip(apar.get("per_round", []), base.get("per_round", []))],
                "peak_kv_ratio": apar["peak_kv_blocks"] / max(1, base["peak_kv_blocks"]),
                "latency_p50_ratio": apar["latency_p50"] / base["latency_p50"],
            })
    return rows


def print_table(result: dict) -> None:
    print(f"{'KV':>6s} {'clients':>7s} {'mode':>9s} {'tok/s':>8s} {'steady':>8s} {'lat mean':>8s} {'p50':>7s} {'p99':>7s} {'peak KV':>7s} "
          f"{'preempt':>7s} {'recomp':>7s} {'serial':>7s} {'defer':>6s}")
    for r in result["runs"]:
        print(
            f"{r['kv_blocks']:6d} {r['concurrency']:7d} {r['mode']:>9s} {r['tok_s']:8.1f} {r['steady_tok_s']:8.1f} "
            f"{r['latency_mean']:7.2f}s "
            f"{r['latency_p50']:6.2f}s {r['latency_p99']:6.2f}s {r['peak_kv_blocks']:7d} {r['preemptions']:7d} "
            f"{r.get('recomputed_tokens', 0):7d} {r.get('serialized_steps', 0):7d} {r.get('deferred_forks', 0):6d}"
            + ("  rounds: " + " ".join(f"{x['tok_s']:.1f}" for x in r["per_round"]) + " tok/s" if "per_round" in r else "")
        )
    for row in result["comparison"]:
        print(
            f"KV {row['kv_blocks']}, {row['concurrency']} clients: {row.get('mode', 'apar').upper()} throughput {row['throughput_gain_pct']:+.0f}% "
            f"(steady {'-' if row['steady_gain_pct'] is None else format(row['steady_gain_pct'], '+.0f')}%) vs {row['baseline']}, peak KV {row['peak_kv_ratio']:.0%} of its, p50 latency x{row['latency_p50_ratio']:.2f}"
            + (" (rounds: " + " ".join(f"{g:+.0f}%" for g in row["throughput_gain_pct_rounds"]) + ")"
               if row.get("throughput_gain_pct_rounds") else "")
        )


def plot(result: dict, path: str) -> None:
    """One row per KV pool: tokens/s (whole run solid, steady dashed), p50 (solid) and p99
    (dashed) latency, and preemptions
    against clients, one line per mode."""
    plt = pyplot()
    runs, pools = result["runs"], sorted(result["config"]["kv_blocks"])
    fig, axes = plt.subplots(len(pools), 3, figsize=(13, 3.6 * len(pools)), squeeze=False)
    for row, blocks in zip(axes, pools):
        for mode in result["config"].get("modes", MODES):
            at = sorted((r for r in runs if r["mode"] == mode and r["kv_blocks"] == blocks), key=lambda r: r["concurrency"])
            clients = [r["concurrency"] for r in at]
            line = row[0].plot(clients, [r["tok_s"] for r in at], "o-", label=mode.upper())[0]
            row[0].plot(clients, [r["steady_tok_s"] for r in at], "x--", color=line.get_color(), label=f"{mode.upper()} steady")
            row[1].plot(clients, [r["latency_p50"] for r in at], "o-", color=line.get_color(), label=f"{mode.upper()} p50")
            row[1].plot(clients, [r["latency_p99"] for r in at], "x--", color=line.get_color(), label=f"{mode.upper()} p99")
            row[2].plot(clients, [r["preemptions"] for r in at], "o-", color=line.get_color(), label=mode.upper())
        row[0].set(xscale="log", xlabel="concurrent clients", ylabel="answer tokens/s", title=f"throughput (KV {blocks} blocks)")
        row[1].set(xscale="log", xlabel="concurrent clients", ylabel="latency (s)", title=f"request latency (KV {blocks} blocks)")
        row[2].set(xscale="log", xlabel="concurrent clients", ylabel="preemptions", title=f"preemptions (KV {blocks} blocks)")
        row[2].set_ylim(bottom=0, top=max([1] + [r["preemptions"] for r in runs if r["kv_blocks"] == blocks]) * 1.1)
        for ax in row:
            ax.set_xticks(result["config"]["concurrency"], [str(c) for c in result["config"]["concurrency"]])
            ax.legend(fontsize=8)
    fig.suptitle(f"parafork bench throughput ({result['date']}, {result['commit']}, {result.get('machine', '')})")
    save_figure(fig, path)


def run(args) -> dict:
    if args.draft_head is not None and args.spec != "eagle":
        raise ValueError("--draft-head applies with --spec eagle (the drafts from a trained head)")
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    result = run_throughput(
        questions, parse_list(args.concurrency, "--concurrency", int), parse_list(args.kv_blocks, "--kv-blocks", int),
        args.model, args.adapter, args.dtype, args.cpu_threads, args.max_tokens, args.requests_per_client,
        args.backend, args.quant, args.rounds, tuple(parse_list(args.modes, "--modes", str, ALL_MODES)), args.spec, args.draft_head or "bundled",
    )
    result["config"]["suite"] = args.suite
    return report(result, args, print_table, plot)
