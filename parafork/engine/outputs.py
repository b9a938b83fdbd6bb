"""What the engine gives out: a request's output after each step it took part in
(`RequestOutput`), and a snapshot of the engine's counts (`EngineStats`)."""
from __future__ import annotations

from dataclasses import dataclass

from .thread import Request, RequestTimes, TreeShape


@dataclass
class RequestOutput:
    request_id: str
    text: str  # restored answer in reading order (streaming: final text so far; else set when finished)
    delta: str  # text that became final since the previous output of this request
    token_ids: list[int]  # restored answer tokens, no control tokens
    finished: bool
    finish_reason: str | None
    num_generated_tokens: int  # over all threads, control tokens included
    num_steps: int  # forward passes the request took part in (decode steps)
    num_threads: int
    peak_kv_blocks: int
    num_prompt_tokens: int
    attention_work: int = 0  # sum over fed tokens of the KV length each attends to
    num_preemptions: int = 0
    num_recomputed_tokens: int = 0  # tokens fed again after preemptions (prefix-cache hits not counted)
    num_serialized_steps: int = 0  # steps its threads ran one at a time for lack of KV (scheduler.py)
    num_deferred_forks: int = 0  # forks whose child got its KV a step later, rows being dear (engine.py)
    num_draft_tokens: int = 0  # speculative draft tokens fed (engine/speculation.py)
    num_accepted_tokens: int = 0  # of which the model's own samples agreed with
    num_head_draft_tokens: int = 0  # of the drafts, those from a trained head (the rest: lookup)
    num_head_accepted_tokens: int = 0
    num_sibling_tokens: int = 0  # of the head's drafts, siblings fed beside its chains (a tree)
    num_accepted_sibling_tokens: int = 0
    # Per draft position j: drafts fed that reached it, and how many were accepted there.
    drafted_at: tuple[int, ...] = ()
    accepted_at: tuple[int, ...] = ()
    error: str | None = None
    complete: bool = False  # token_ids hold the whole tree (no thread may add tokens before their end)
    # With SamplingParams.logprobs: per restored token, (log-probability, [(token, log-probability)] top).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    shape: TreeShape | None = None  # joins, depth, spine and longest branch (thread.TreeShape)
    # When it was added, first scheduled, first token, finished: the request's own record (no copy),
    # complete once the request has finished, whichever way it ended (a stop string's abort too).
    times: RequestTimes | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot, taken on the engine's own thread; safe to hand to other threads."""

    requests_waiting: int
    requests_running: int
    threads_live: int
    sequences_live: int
    kv_blocks_total: int
    kv_blocks_free: int
    steps_total: int
    requests_total: int
    generated_tokens_total: int
    forks_total: int
    prefix_cache_hit_tokens_total: int
    draft_tokens_total: int = 0
    accepted_draft_tokens_total: int = 0
    head_draft_tokens_total: int = 0  # of the drafts, those from a trained head (the rest: lookup)
    head_accepted_draft_tokens_total: int = 0
    joins_total: int = 0
    preemptions_total: int = 0
    recomputed_tokens_total: int = 0
    serialized_steps_total: int = 0  # request-steps run one thread at a time for lack of KV
    deferred_forks_total: int = 0  # forks whose child got its KV a step later (engine.py)
    growth_ratio: float = 0.0  # admission's estimate of the budget left that becomes KV (scheduler.py)


def request_output(request: Request, tokens: list[int], complete: bool, logprobs) -> RequestOutput:
    """`request`'s output with its restored `tokens` (text and delta are the facade's, `LLM`)."""
    return RequestOutput(
        request_id=request.request_id,
        text="",
        delta="",
        token_ids=tokens,
        finished=request.finished,
        finish_reason=request.finish_reason.value if request.finish_reason else None,
        num_generated_tokens=request.num_generated,
        num_steps=request.num_steps,
        num_threads=len(request.threads),
        peak_kv_blocks=request.peak_blocks,
        num_prompt_tokens=len(request.prompt_token_ids),
        attention_work=request.attention_work,
        num_preemptions=request.num_preemptions,
        num_recomputed_tokens=request.num_recomputed_tokens,
        num_serialized_steps=request.num_serialized_steps,
        num_deferred_forks=request.num_deferred_forks,
        num_draft_tokens=request.num_draft_tokens,
        num_accepted_tokens=request.num_accepted_tokens,
        num_head_draft_tokens=request.num_head_draft_tokens,
        num_head_accepted_tokens=request.num_head_accepted_tokens,
        num_sibling_tokens=request.num_sibling_tokens,
        num_accepted_sibling_tokens=request.num_accepted_sibling_tokens,
        drafted_at=tuple(request.drafted_at),
        accepted_at=tuple(request.accepted_at),
        error=request.error,
        complete=complete,
        logprobs=logprobs,
        shape=request.shape(),
        times=request.times,
    )
