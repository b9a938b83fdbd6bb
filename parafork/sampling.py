"""What a request asks for: `SamplingParams` and the decoding modes. Public and
engine-free: the APAR rules and the sampler that apply them live in `engine/sampler.py`."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping, Protocol, Sequence, get_args

import torch

# apar: threads fork and run side by side; serial: the same tree, one thread at a time
# (a child runs to its end before its parent goes on: APAR's answers at AR's pace, the
# baseline for APAR's parallel speed-up); ar: [Fork] banned; raw: [Fork] may be sampled and
# stays in the text as a marker, no thread starts (for a driver that runs APAR elsewhere).
Mode = Literal["apar", "serial", "ar", "raw"]
MODES: tuple[str, ...] = get_args(Mode)
FORKING_MODES = ("apar", "serial")
MAX_DRAFT_TOKENS = 8  # the most draft tokens a thread verifies per step (sizes llama.cpp's output rows)
MAX_DRAFT_SIBLINGS = 8  # the most siblings per draft position (SamplingParams.num_draft_siblings)
DEFAULT_DRAFT_TOKENS = 4  # num_draft_tokens where a drafting request leaves it unset
DEFAULT_DRAFT_SIBLINGS = 2  # num_draft_siblings where a request drafting with a head leaves it unset


# The penalties and their neutral values (what "off" is).
PENALTIES: dict[str, float] = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
# What a model's generation_config.json may set for requests that leave it unset, and the value when it does not.
DEFAULTABLE: dict[str, float | bool | int] = {**PENALTIES, "join": False, "max_depth": 2}
MAX_DEPTH = 8  # levels of threads a request may ask for


class ThreadView(Protocol):
    """What a logits rule reads of a thread (the engine's `engine/thread.py` Thread is one; named
    here by its shape, so that a request's parameters never name the engine's types)."""

    token_ids: list[int]  # the whole context: inherited prefix + own tokens
    own_start: int
    depth: int
    parent: Any  # the parent thread, None for the root
    children: Mapping[int, Any]  # own index of a [Fork] -> child thread
    request: Any  # its request (`prompt_token_ids`, `params`)

    @property
    def own_tokens(self) -> list[int]: ...


class LogitsRule(Protocol):
    """Edits one thread's float logits row in place before sampling (after the APAR rules)."""

    def __call__(self, thread: ThreadView, logits: torch.Tensor) -> None: ...


# `max_tokens` where a person asks one question and names none: `parafork generate`, `parafork demo`
# and the server (OpenAI's clients leave it unset). The bundled model's answers run to ~350 tokens.
ANSWER_MAX_TOKENS = 512


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # over all threads of the request, control tokens included (the library's default)
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    mode: Mode = "apar"
    # Levels of threads: 2 = root + children, 3 lets a child fork a nested list. None: the
    # model's default (`"max_depth"` in its generation_config.json, as the penalties), else 2.
    max_depth: int | None = None
    max_threads: int = 16  # per request, root included
    ignore_eos: bool = False  # for benchmarks of fixed length
    plan_budget: bool = True  # fork only with room for the body, parents wait near the end (engine/budget.py)
    no_repeat_heads: bool = True  # a forking thread may not repeat an earlier item's head (rules.NoRepeatedHeads)
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit (OpenAI semantics)
    skip_special_tokens: bool = True  # in the text; raw mode shows [Fork] markers regardless
    # The answer ends before the first of these strings in the restored text (reading order).
    stop: str | Sequence[str] = ()
    # Penalties per thread over what that thread sees (its ancestors' tokens up to its fork, then
    # its own): OpenAI's frequency/presence over answer tokens, vLLM's repetition over the prompt too.
    # None: the model's default (`LLM.sampling_defaults`, from the model's or adapter's
    # generation_config.json, as vLLM does; off where it names none: 0 / 0 / 1.0).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    # Log-probabilities of the restored tokens under the model (its raw distribution), plus the
    # `logprobs` most likely alternatives per token; None: none.
    logprobs: int | None = None
    # Speculative decoding inside every thread (engine/speculation.py): "ngram" drafts up to
    # `num_draft_tokens` tokens per step by prompt lookup, "eagle" from the engine's trained draft
    # head (engine/eagle.py); "off" never; None: the engine's default.
    # The engine refuses either count where the request does not draft that way (nothing set is
    # silently ignored); None: DEFAULT_DRAFT_TOKENS / DEFAULT_DRAFT_SIBLINGS where it does.
    speculative: Literal["ngram", "eagle", "off"] | None = None
    num_draft_tokens: int | None = None
    # With "eagle", on a runner that takes tree slices: per position of the head's draft, its
    # next most likely tokens there (drawn ones for a sampled request), fed beside the chain where
    # they pay (engine.py); 0: chains.
    num_draft_siblings: int | None = None
    # Joins (engine/thread.py, `Join`): whether a forking thread may sample `[Join]`, after which it
    # attends to the children it forked since its previous join; while it may, finished children
    # keep their KV until their parent joins or ends. None: the model's default (`"join"` in its
    # generation_config.json, as the penalties), off where it names none; raw and ar modes never join.
    join: bool | None = None
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
        if self.mode not in MODES:
            raise bad(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.logit_bias is not None and not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, (int, float)) and -100 <= v <= 100
            for k, v in self.logit_bias.items()
        ):
            raise bad("logit_bias maps token ids to values in [-100, 100]")
        if self.max_depth is not None and (problem := self.max_depth_problem(self.max_depth)) is not None:
            raise bad(problem)
        if not isinstance(self.max_threads, int) or self.max_threads < 1:
            raise bad(f"max_threads must be >= 1, got {self.max_threads!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise bad(f"stop takes non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        for name in PENALTIES:
            if (problem := self.penalty_problem(name, getattr(self, name), none_ok=True)) is not None:
                raise bad(problem)
        if self.speculative not in (None, "ngram", "eagle", "off"):
            raise bad(f"speculative must be None, 'ngram', 'eagle' or 'off', got {self.speculative!r}")
        k = self.num_draft_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS):
            raise bad(f"num_draft_tokens must be None or an integer in [1, {MAX_DRAFT_TOKENS}], got {k!r}")
        s = self.num_draft_siblings
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_DRAFT_SIBLINGS):
            raise bad(f"num_draft_siblings must be None or an integer in [0, {MAX_DRAFT_SIBLINGS}], got {s!r}")
        if self.join not in (None, True, False):
            raise bad(f"join must be None, True or False, got {self.join!r}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20):
            raise bad(f"logprobs must be None or an integer in [0, 20], got {lp!r}")

    @staticmethod
    def penalty_problem(name: str, value, none_ok: bool = False) -> str | None:
        """Why `value` is not a valid `name` penalty, or None: frequency and presence in [-2, 2]
        (OpenAI's range), repetition in (0, 10]."""
        if value is None and none_ok:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        ok = 0 < value <= 10 if name == "repetition_penalty" else -2 <= value <= 2
        return None if ok else f"{name} must be in {'(0, 10]' if name == 'repetition_penalty' else '[-2, 2]'}, got {value!r}"

    @staticmethod
    def max_depth_problem(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DEPTH:
            return f"max_depth must be an integer in [1, {MAX_DEPTH}], got {value!r}"
        return None

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty not in (None, 1))

    def with_defaults(self, defaults: Mapping[str, float] | None = None) -> SamplingParams:
        """These params with every penalty, `join` and `max_depth` left at None taken from `defaults` (a
        model's `sampling_defaults`), else off. The engine decodes only such resolved params."""
        unset = {name: (defaults or {}).get(name, off) for name, off in DEFAULTABLE.items() if getattr(self, name) is None}
        return replace(self, **unset) if unset else self

    def drafting_problem(self) -> str | None:
        """Why a draft count is set that this request's drafting never reads (None: none is), for
        params whose `speculative` is resolved (the engine's default put in)."""
        method = self.speculative if self.speculative in ("ngram", "eagle") else None
        if method is None:
            named = [n for n in ("num_draft_tokens", "num_draft_siblings") if getattr(self, n) is not None]
            if named:
                return (f"{' and '.join(named)} set, but this request does not draft (speculative="
                        f"{self.speculative!r}): ask for speculative='ngram' or 'eagle', or leave {'them' if len(named) > 1 else 'it'} unset")
        elif method == "ngram" and self.num_draft_siblings is not None:
            return ("num_draft_siblings is for a trained head's drafts (speculative='eagle'); n-gram lookup drafts "
                    "chains only: leave it unset")
        return None

    def with_draft_defaults(self) -> SamplingParams:
        """These params with the draft counts their drafting reads put in where unset (resolved
        `speculative`; see `drafting_problem`)."""
        unset = {}
        if self.speculative in ("ngram", "eagle") and self.num_draft_tokens is None:
            unset["num_draft_tokens"] = DEFAULT_DRAFT_TOKENS
        if self.speculative == "eagle" and self.num_draft_siblings is None:
            unset["num_draft_siblings"] = DEFAULT_DRAFT_SIBLINGS
        return replace(self, **unset) if unset else self

    @property
    def joins(self) -> bool:
        """Whether this request's threads may join (resolved params only)."""
        return bool(self.join) and self.mode in FORKING_MODES

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
