"""Skeleton-of-Thought (Ning et al., 2023): the training-free rival of APAR.

Stage 1 asks the model for a short numbered outline of the answer; stage 2 expands every
outline point in its own request, all batched together in the engine, and the answer is
the points in order. Written here from the paper's description, for an untuned model:
each point gets at most 64 tokens and ends at its first blank line (the untuned 135M model
does not stop by itself after one or two sentences).
"""
from __future__ import annotations

import re
import time

from ..llm import LLM
from ..sampling import SamplingParams
from .common import timed_run

SKELETON_PROMPT = (
    "You are an organizer. Do not answer the question below; give only the skeleton of an answer: "
    "a numbered list (1., 2., 3., ...) of 3 to 10 points, each only 3 to 5 words.\n\n"
    "Question: {question}"
)
POINT_PROMPT = (
    "Question: {question}\n\nThe answer's skeleton is:\n{skeleton}\n\n"
    "Write only point {index} of the answer, in one or two short sentences. Do not write any other point."
)
POINT_RE = re.compile(r"^\s*(\d{1,2})[.)]\s*(.+?)\s*$", re.M)
SKELETON_TOKENS = 96  # an outline of up to 10 points of 3-5 words
MAX_POINTS = 10
POINT_TOKENS = 64  # "one or two short sentences"; small models do not stop by themselves


def parse_skeleton(text: str) -> list[str]:
    """The outline points, in order, from `1. ...` lines (numbering as written)."""
    return [m.group(2) for m in POINT_RE.finditer(text)][:MAX_POINTS]


def _assistant_prefix(llm: LLM, prompt: str, prefix: str) -> dict:
    """A chat prompt whose answer already starts with `prefix` (the point being expanded)."""
    ids = llm.encode(prompt) + llm.tokenizer.encode(prefix, add_special_tokens=False)
    return {"prompt_token_ids": ids}


def answer(llm: LLM, question: str, max_tokens: int) -> dict:
    """The SoT answer and its figures, keyed as `bench latency` records them (`threads`: the
    parallel point requests, at least 1; `steps`: the skeleton's plus the batched points')."""
    start = time.perf_counter()
    skeleton_params = SamplingParams(max_tokens=min(SKELETON_TOKENS, max_tokens), mode="ar")
    first = timed_run(llm, [_assistant_prefix(llm, SKELETON_PROMPT.format(question=question), "1.")], skeleton_params)
    skeleton = "1." + first.outputs[0].text
    points = parse_skeleton(skeleton)
    runs = [first]
    if points:  # else the skeleton is all SoT has to show
        outline = "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))
        used = first.outputs[0].num_generated_tokens
        point_params = SamplingParams(max_tokens=max(16, min(POINT_TOKENS, (max_tokens - used) // len(points))), mode="ar")
        prompts = [
            _assistant_prefix(llm, POINT_PROMPT.format(question=question, skeleton=outline, index=i), f"{i}. {p}")
            for i, p in enumerate(points, 1)
        ]
        runs.append(timed_run(llm, prompts, point_params))
        # A point ends at its first blank line: what a model writes after it belongs to other points.
        bodies = [out.text.strip("\n").split("\n\n")[0] for out in runs[1].outputs]
        text = "\n".join(f"{i}. {p} {body.strip()}" for i, (p, body) in enumerate(zip(points, bodies), 1))
    else:
        text = skeleton
    outputs = [o for run in runs for o in run.outputs]
    return {
        "text": text,
        "tokens": len(llm.tokenizer.encode(text, add_special_tokens=False)),
        "generated": sum(o.num_generated_tokens for o in outputs),
        "steps": sum(run.steps for run in runs),
        "wall_s": time.perf_counter() - start,
        "prefill_s": first.prefill_s,
        "threads": max(1, len(points)),
        "peak_kv_blocks": max(run.peak_pool_blocks for run in runs),
        "attn_work": sum(o.attention_work for o in outputs),
    }
