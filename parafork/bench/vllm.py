"""`parafork bench latency|throughput --backend vllm`: APAR on real vLLM against vLLM's own AR.

One `vllm serve` (`vllm.server.VLLMServer`, the tuned model merged, APAR's rules plugin
loaded) serves every mode of the run, so the modes meet the same server, back to back:

- `vllm-ar`: vLLM's own decoding of the merged model, one plain request per answer (control
  tokens banned by `logit_bias`, vLLM's built-in penalties, no plugin);
- `vllm-apar`: APAR on vLLM (`vllm.driver.VLLMDriver`): one vLLM request per thread;
- `vllm-serial`: the same tree one request at a time (a parent stops at each `[Fork]`);
- `engine-apar`, `engine-ar`: parafork's own engine in this process, same params, for the
  same answers (`same_as_engine`: greedy token ids equal) and the speed of both engines.

Latency: one question at a time, per answer tokens, seconds, threads, vLLM requests, prompt
tokens sent and those vLLM computed (`prefilled`: not in its prefix cache); per category
tokens/s ratios (the answers differ in length between AR and APAR), APAR vs AR wall-time
ratios on identical trees (`vllm-serial`), and the fork cost (tokens re-prefilled per fork:
a child's request re-prefills the parent's last partial KV block and its `[Child]`).
Throughput: C clients at once (C in --concurrency), each --requests-per-client answers in
turn, APAR vs AR on vLLM:
answer tokens/s over the wave, mean and p90 latency, peak KV use (vLLM's gauge, polled).
"""
from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time

from tqdm.auto import tqdm

from .. import models
from ..config import resolve_dtype
from ..vllm.driver import VLLMDriver, driver_params
from ..vllm.server import VLLMServer, merged_model, vllm_unavailable
from .common import (Checkpoint, by_category, grouped_bars, metadata, percentile, pyplot, report, resolve_penalties,
                     save_figure)
from .latency import answer_checks
from .suite import load_suite, select

LATENCY_MODES = ("vllm-ar", "vllm-apar", "vllm-serial", "engine-apar", "engine-ar")
DEFAULT_LATENCY_MODES = "vllm-ar,vllm-apar,engine-apar"
NOT_LIST_LIKE = ("coding", "math")  # Vicuna's other seven categories are list-like


def dtype_name(args) -> str:
    """vLLM's --dtype: the engine's rule ('auto': bf16 only where the CPU computes it natively)."""
    return str(resolve_dtype(args.dtype)).removeprefix("torch.")


def start_server(args) -> VLLMServer:
    reason = vllm_unavailable()
    if reason:
        raise ValueError(f"--backend vllm: {reason}")
    return VLLMServer(merged_model(args.model, args.adapter, dtype_name(args)), dtype=dtype_name(args),
                      extra_args=args.vllm_arg or [])


def make_driver(server: VLLMServer, args, fork_limit: int | None = None) -> VLLMDriver:
    path = models.resolve_model_path(args.model)
    tokenizer, control = models.load_tokenizer(path)
    adapter = args.adapter or models.default_adapter(args.model)
    return VLLMDriver(server.url, server.served_name, tokenizer, control, models.sampling_defaults(path, adapter),
                      tree_priority=server.priority_scheduling, fork_limit=fork_limit)


def _record(out, seconds: float) -> dict:
    return {
        "text": out.text, "token_ids": out.token_ids, "answer_tokens": len(out.token_ids), "seconds": seconds,
        "threads": out.num_threads, "finish_reason": out.finish_reason, **answer_checks(out.text, out.finish_reason),
        **({"requests": out.num_requests, "prompt_tokens": out.prompt_tokens, "prefilled": out.prefilled_tokens,
            "child_prompt_tokens": out.child_prompt_tokens, "child_prefilled": out.child_prefilled_tokens,
            "child_reported": out.child_requests_reported}
           if hasattr(out, "num_requests") else {"steps": out.num_steps}),
    }


def _engine_record(llm, prompt, params) -> dict:
    start = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    return _record(out, time.perf_counter() - start)


def _ratio(records: list[dict], a: str, b: str, tok_s: bool) -> float | None:
    rs = [r for r in records if a in r and b in r]
    if not rs:
        return None
    ta, tb = sum(r[a]["seconds"] for r in rs), sum(r[b]["seconds"] for r in rs)
    if not tok_s:
        return tb / ta
    return (sum(r[a]["answer_tokens"] for r in rs) / ta) / (sum(r[b]["answer_tokens"] for r in rs) / tb)


def _agreement(records: list[dict], a: str, b: str, suffix: str) -> dict:
    """How far two engines' greedy answers agree: the share equal token for token, and the mean
    share of each answer (restored tokens, of the longer one) before the first difference. Answers
    that part late in the same tree shape point to rounding (the engines sum in another order, and a
    near tie goes the other way), not to a different decoding rule."""
    pairs = [(r[a]["token_ids"], r[b]["token_ids"]) for r in records]
    agreed = [len(os.path.commonprefix([x, y])) / max(1, len(x), len(y)) for x, y in pairs]
    return {f"same{suffix}_as_engine": sum(x == y for x, y in pairs) / len(pairs),
            f"agreed{suffix}_share": statistics.mean(agreed)}


def _summary(records: list[dict], modes: list[str]) -> dict:
    out: dict = {}
    if "vllm-apar" in modes and "vllm-ar" in modes:
        out["apar_vs_ar_tok_s"] = _ratio(records, "vllm-apar", "vllm-ar", tok_s=True)
    if "vllm-apar" in modes and "vllm-serial" in modes:
        out["apar_vs_serial"] = _ratio(records, "vllm-apar", "vllm-serial", tok_s=False)
    if "vllm-apar" in modes and "engine-apar" in modes:
        out.update(_agreement(records, "vllm-apar", "engine-apar", ""))
        out["same_threads_as_engine"] = sum(r["vllm-apar"]["threads"] == r["engine-apar"]["threads"] for r in records) / len(records)
        out["vllm_vs_engine_apar_tok_s"] = _ratio(records, "vllm-apar", "engine-apar", tok_s=True)
    if "vllm-ar" in modes and "engine-ar" in modes:
        out.update(_agreement(records, "vllm-ar", "engine-ar", "_ar"))
        out["vllm_ar_vs_engine_ar_tok_s"] = _ratio(records, "vllm-ar", "engine-ar", tok_s=True)
    for mode in modes:
        rs = [r[mode] for r in records]
        out[mode] = {
            "tok_s": sum(r["answer_tokens"] for r in rs) / sum(r["seconds"] for r in rs),
            "fork_rate": sum(r["threads"] > 1 for r in rs) / len(rs),
            "threads": statistics.mean(r["threads"] for r in rs),
            "cut": sum(r["cut"] for r in rs) / len(rs),
            "repeated_head": sum(r["repeated_head"] for r in rs) / len(rs),
        }
    if "vllm-apar" in modes:
        rs = [r["vllm-apar"] for r in records]
        forks = sum(r["threads"] - 1 for r in rs)
        out["requests_per_answer"] = statistics.mean(r["requests"] for r in rs)
        if forks:  # what the children's requests sent, and what vLLM computed of it (not in its prefix cache)
            out["prompt_tokens_per_fork"] = sum(r["child_prompt_tokens"] for r in rs) / forks
            reported = sum(r["child_reported"] for r in rs)
            if reported and all(r["child_prefilled"] >= 0 for r in rs):
                out["prefilled_per_fork"] = sum(r["child_prefilled"] for r in rs) / reported
    return out


def run_latency(args, questions: list[dict]) -> dict:
    from .common import parse_list, penalties_of

    modes = parse_list(args.modes or DEFAULT_LATENCY_MODES, "--modes", allowed=LATENCY_MODES)
    penalties = resolve_penalties(penalties_of(args), args.model, args.adapter)
    params = {m: driver_params(mode=m.split("-", 1)[1], max_tokens=args.max_tokens, **penalties) for m in modes}
    checkpoint = Checkpoint(args.json, {"bench": "latency-vllm", "model": args.model, "adapter": args.adapter,
                                        "max_tokens": args.max_tokens, "modes": modes, "dtype": dtype_name(args),
                                        "weights": dtype_name(args)})
    llm = None
    if any(m.startswith("engine-") for m in modes):
        from ..llm import LLM

        llm = LLM(args.model, adapter=args.adapter, dtype=args.dtype, cpu_threads=args.cpu_threads)
    records = []
    with start_server(args) as server:
        driver = make_driver(server, args)
        driver.generate("Hello", driver_params(mode="ar", max_tokens=4))  # warm-up
        for q in tqdm(questions, desc="latency (vLLM)", unit="question"):
            if not (record := checkpoint.get(q)):
                record = dict(q)
                for mode in modes:
                    if mode.startswith("engine-"):
                        record[mode] = _engine_record(llm, q["prompt"], params[mode])
                    else:
                        out = driver.generate(q["prompt"], params[mode])
                        record[mode] = _record(out, out.seconds)
                checkpoint.add(record)
            records.append(record)
    checkpoint.finish()
    list_like = [r for r in records if r["category"] not in NOT_LIST_LIKE]
    plain = [r for r in records if r["category"] in NOT_LIST_LIKE]
    return {
        "bench": "latency", "backend": "vllm", "modes": modes,
        "config": {"model": args.model, "suite": args.suite, "max_tokens": args.max_tokens, "dtype": dtype_name(args),
                   "penalties": penalties, "server": " ".join(server.command[1:])},
        **metadata(args.cpu_threads),
        "overall": _summary(records, modes),
        "list_like": _summary(list_like, modes) if list_like else None,
        "coding_math": _summary(plain, modes) if plain else None,
        "categories": by_category(records, lambda rs: _summary(rs, modes)),
        "questions": records,
    }


def print_latency(result: dict) -> None:
    modes = result["modes"]
    print(f"APAR on vLLM ({result['machine']}, {result['config']['dtype']}), {len(result['questions'])} questions, "
          f"max_tokens {result['config']['max_tokens']}, greedy, one request at a time")
    header = f"{'category':16s}" + "".join(f"{m + ' tok/s':>18s}" for m in modes) + f"{'APAR/AR tok/s':>15s}{'forks':>7s}"
    print(header)
    rows = [*result["categories"].items(), ("list-like (7)", result["list_like"]), ("coding+math", result["coding_math"]),
            ("all", result["overall"])]
    for name, s in rows:
        if not s:
            continue
        ratio = s.get("apar_vs_ar_tok_s")
        fork = s.get("vllm-apar", {}).get("fork_rate")
        print(f"{name:16s}" + "".join(f"{s[m]['tok_s']:18.1f}" for m in modes)
              + (f"{ratio:14.2f}x" if ratio else " " * 15) + (f"{fork:7.0%}" if fork is not None else ""))
    o = result["overall"]
    for key, text in [("same_as_engine", "APAR answers equal to parafork's engine's (greedy token ids)"),
                      ("agreed_share", "share of an APAR answer before it parts from the engine's (mean)"),
                      ("same_threads_as_engine", "APAR answers with as many threads as the engine's"),
                      ("same_ar_as_engine", "AR answers equal to parafork's engine's AR (greedy token ids)"),
                      ("agreed_ar_share", "share of an AR answer before it parts from the engine's (mean)"),
                      ("apar_vs_serial", "APAR vs the same trees one request at a time (wall time)"),
                      ("vllm_vs_engine_apar_tok_s", "APAR on vLLM vs on parafork's engine (tokens/s)"),
                      ("requests_per_answer", "vLLM requests per APAR answer"),
                      ("prompt_tokens_per_fork", "prompt tokens sent per fork"),
                      ("prefilled_per_fork", "tokens vLLM re-prefilled per fork (not in its prefix cache)")]:
        if o.get(key) is not None:
            share = "same" in key or "share" in key
            print(f"{text}: {o[key]:.0%}" if share else f"{text}: {o[key]:.2f}" + ("x" if "vs" in key else ""))


def plot_latency(result: dict, path: str) -> None:
    plt = pyplot()
    cats = list(result["categories"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    series = {"APAR on vLLM / vLLM AR (tokens/s)": [result["categories"][c].get("apar_vs_ar_tok_s") or 0 for c in cats]}
    if "engine-apar" in result["modes"] and "vllm-ar" in result["modes"]:
        series["APAR on parafork's engine / vLLM AR (tokens/s)"] = [
            _ratio([r for r in result["questions"] if r["category"] == c], "engine-apar", "vllm-ar", tok_s=True) or 0
            for c in cats]
    grouped_bars(ax, cats, series)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("speed-up (tokens/s ratio)")
    ax.set_title(f"APAR on real vLLM, {result['config']['suite']}, {result['machine']}")
    save_figure(fig, path)


# -- throughput ------------------------------------------------------------------------------


def _poll_kv(server: VLLMServer, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], server.metrics().get("vllm:kv_cache_usage_perc", 0.0))
        except OSError:
            pass
        stop.wait(0.25)


def _wave(driver: VLLMDriver, server: VLLMServer, prompts: list[list[str]], mode: str, max_tokens: int,
          penalties) -> dict:
    """Each client (one list of prompts) sends its answers one after another; all clients at once."""
    params = driver_params(mode=mode, max_tokens=max_tokens, **penalties)

    async def client(queue: list[str]):
        return [await driver.generate_async(p, params) for p in queue]

    async def all_clients():
        return [o for outs in await asyncio.gather(*(client(q) for q in prompts)) for o in outs]

    stop, peak = threading.Event(), [0.0]
    poller = threading.Thread(target=_poll_kv, args=(server, stop, peak), daemon=True)
    poller.start()
    start = time.perf_counter()
    outs = driver.run(all_clients())
    wall = time.perf_counter() - start
    stop.set()
    poller.join()
    latencies = [o.seconds for o in outs]
    tokens = sum(len(o.token_ids) for o in outs)
    return {"clients": len(prompts), "answers": len(outs), "wall_s": wall, "answer_tokens": tokens, "tok_s": tokens / wall,
            "latency_mean_s": statistics.mean(latencies), "latency_p90_s": percentile(latencies, 90),
            "peak_kv_usage": peak[0], "threads": statistics.mean(o.num_threads for o in outs),
            "requests": sum(o.num_requests for o in outs), "cut": sum(o.finish_reason == "length" for o in outs),
            "requests_unforked": sum(o.requests_unforked for o in outs)}


def run_throughput(args, questions: list[dict], concurrency: list[int]) -> dict:
    penalties = resolve_penalties(None, args.model, args.adapter)
    prompts = [q["prompt"] for q in questions]
    levels = []
    with start_server(args) as server:
        driver = make_driver(server, args)
        limited = make_driver(server, args, args.fork_limit) if args.fork_limit is not None else None
        driver.generate("Hello", driver_params(mode="ar", max_tokens=4))  # warm-up
        for c in tqdm(concurrency, desc="throughput (vLLM)", unit="level"):
            r = args.requests_per_client
            wave = [[prompts[(i * r + k) % len(prompts)] for k in range(r)] for i in range(c)]
            level = {"clients": c}
            for mode in ("ar", "apar"):  # AR first each time, then APAR on the same prompts
                level[mode] = _wave(driver, server, wave, mode, args.max_tokens, penalties)
            level["apar_vs_ar_tok_s"] = level["apar"]["tok_s"] / level["ar"]["tok_s"]
            if limited is not None:  # then APAR whose requests may not fork under load (--fork-limit)
                level["apar_limited"] = _wave(limited, server, wave, "apar", args.max_tokens, penalties)
                level["apar_limited_vs_ar_tok_s"] = level["apar_limited"]["tok_s"] / level["ar"]["tok_s"]
            levels.append(level)
        command = " ".join(server.command[1:])
    return {"bench": "throughput", "backend": "vllm", "config": {"model": args.model, "suite": args.suite,
            "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client, "dtype": dtype_name(args),
            "fork_limit": args.fork_limit,
            "penalties": penalties, "server": command},
            **metadata(args.cpu_threads), "levels": levels}


def print_throughput(result: dict) -> None:
    print(f"throughput on vLLM ({result['machine']}, {result['config']['dtype']}), max_tokens "
          f"{result['config']['max_tokens']}, {result['config']['requests_per_client']} answers per client in turn, "
          "AR then APAR on the same prompts")
    print(f"{'clients':>8s}{'AR tok/s':>10s}{'APAR tok/s':>12s}{'gain':>8s}{'AR lat s':>10s}{'APAR lat s':>12s}"
          f"{'AR p90':>8s}{'APAR p90':>10s}{'AR KV':>7s}{'APAR KV':>9s}{'threads':>9s}")
    for lv in result["levels"]:
        a, p = lv["ar"], lv["apar"]
        print(f"{lv['clients']:8d}{a['tok_s']:10.1f}{p['tok_s']:12.1f}{lv['apar_vs_ar_tok_s'] - 1:+8.0%}"
              f"{a['latency_mean_s']:10.1f}{p['latency_mean_s']:12.1f}{a['latency_p90_s']:8.1f}{p['latency_p90_s']:10.1f}"
              f"{a['peak_kv_usage']:7.0%}{p['peak_kv_usage']:9.0%}{p['threads']:9.1f}")
    limit = result["config"].get("fork_limit")
    if limit is not None:
        print(f"APAR with --fork-limit {limit} (requests sent while the driver had {limit} or more open may not fork):")
        print(f"{'clients':>8s}{'tok/s':>10s}{'vs AR':>8s}{'lat s':>8s}{'p90':>8s}{'KV':>6s}{'threads':>9s}"
              f"{'requests':>10s}{'unforked':>10s}")
        for lv in result["levels"]:
            q = lv["apar_limited"]
            print(f"{lv['clients']:8d}{q['tok_s']:10.1f}{lv['apar_limited_vs_ar_tok_s'] - 1:+8.0%}{q['latency_mean_s']:8.1f}"
                  f"{q['latency_p90_s']:8.1f}{q['peak_kv_usage']:6.0%}{q['threads']:9.1f}{q['requests']:10d}"
                  f"{q['requests_unforked']:10d}")


def plot_throughput(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    clients = [lv["clients"] for lv in result["levels"]]
    modes = [("ar", "vLLM AR"), ("apar", "APAR on vLLM")]
    if result["config"].get("fork_limit") is not None:
        modes.append(("apar_limited", f"APAR, fork limit {result['config']['fork_limit']}"))
    for mode, label in modes:
        ax1.plot(clients, [lv[mode]["tok_s"] for lv in result["levels"]], "o-", label=label)
        ax2.plot(clients, [lv[mode]["latency_mean_s"] for lv in result["levels"]], "o-", label=label)
    for ax, y in ((ax1, "answer tokens/s (all clients)"), (ax2, "mean latency per answer (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(y)
        ax.legend()
    fig.suptitle(f"APAR on real vLLM vs vLLM AR, {result['machine']}")
    save_figure(fig, path)


def run(args) -> dict:
    """`parafork bench latency|throughput --backend vllm`."""
    from .common import parse_list

    if args.quant is not None:
        raise ValueError("--quant applies to the llamacpp backend; vLLM serves the merged HF folder")
    if args.what == "latency" and args.fork_limit is not None:
        raise ValueError("--fork-limit acts under load: use it with bench throughput (latency sends one answer at a time)")
    if args.what == "latency" and args.spec:
        raise ValueError("--spec: the vLLM driver leaves speculative decoding to vLLM's own options (--vllm-arg)")
    if args.what == "latency" and args.temperature:
        raise ValueError("--temperature: the vLLM latency bench decodes greedily (its answers are compared with the engine's)")
    if args.what == "latency":
        return latency(args)
    if args.what == "throughput":
        return throughput(args, parse_list(args.concurrency, "--concurrency", int))
    raise ValueError(f"bench {args.what} has no vLLM backend")


def latency(args) -> dict:
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    return report(run_latency(args, questions), args, print_latency, plot_latency)


def throughput(args, concurrency: list[int]) -> dict:
    questions = select(load_suite(args.suite), args.limit, args.per_category)
    return report(run_throughput(args, questions, concurrency), args, print_throughput, plot_throughput)
