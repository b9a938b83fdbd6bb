"""Sampling parameters, the APAR logit rules, and the sampler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Sequence

import torch

from .tokens import ControlTokens

if TYPE_CHECKING:
    from .engine.thread import Thread

Mode = Literal["apar", "ar"]


class LogitsRule(Protocol):
    """Edits one thread's float logits row in place before sampling (after the APAR rules)."""

    def __call__(self, thread: Thread, logits: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # over all threads of the request, control tokens included
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    mode: Mode = "apar"
    max_depth: int = 2  # root + children; raise for nested forks
    max_threads: int = 16  # per request, root included
    ignore_eos: bool = False  # for benchmarks of fixed length
    logits_rules: Sequence[LogitsRule] = ()

    def __post_init__(self) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"SamplingParams: {what}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise bad(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.mode not in ("apar", "ar"):
            raise bad(f"mode must be 'apar' or 'ar', got {self.mode!r}")
        if not isinstance(self.max_depth, int) or self.max_depth < 1:
            raise bad(f"max_depth must be >= 1, got {self.max_depth!r}")
        if not isinstance(self.max_threads, int) or self.max_threads < 1:
            raise bad(f"max_threads must be >= 1, got {self.max_threads!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_apar_rules(logits: torch.Tensor, threads: Sequence[Thread], control: ControlTokens) -> None:
    """The decoding rules of APAR, in place on `[B, V]` logits.

    `[Child]` is never sampled. `[Fork]` is banned in AR mode, right after `[Fork]`/`[Child]`,
    at the depth cap (a thread of depth d may fork only if d + 1 < max_depth), and when
    the request already has max_threads threads.
    """
    logits[:, control.child_id] = float("-inf")
    no_fork = [
        i
        for i, t in enumerate(threads)
        if t.request.params.mode == "ar"
        or t.last_token in (control.fork_id, control.child_id)
        or t.depth + 1 >= t.request.params.max_depth
        or len(t.request.threads) >= t.request.params.max_threads
    ]
    if no_fork:
        logits[no_fork, control.fork_id] = float("-inf")


def sample(logits: torch.Tensor, threads: Sequence[Thread]) -> list[int]:
    """One token per row: argmax for greedy requests, temperature + top-p otherwise."""
    chosen = logits.argmax(dim=-1).tolist()
    for i, thread in enumerate(threads):
        params = thread.request.params
        if params.greedy:
            continue
        probs = torch.softmax(logits[i] / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        chosen[i] = int(torch.multinomial(probs, 1, generator=thread.generator))
    return chosen
