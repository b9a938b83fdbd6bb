"""APAR's decoding rules inside vLLM's own process: a vLLM logits processor.

Loaded by `vllm serve MODEL --logits-processors parafork.vllm.plugin:APARRules` (parafork
on vLLM's PYTHONPATH; `parafork.vllm.server` starts it so), it lets one vLLM request be one
APAR thread decoded as parafork's engine decodes it (`engine/sampler.py`):

- `[Child]` and `[Join]` are never sampled (a vLLM thread cannot join: joins attend to
  siblings' KV, which vLLM's requests do not share);
- `[Fork]` only where the thread may fork (`apar_fork`: the driver's depth cap and mode),
  and never right after `[Fork]` or `[Child]`;
- penalties over what the thread sees (its ancestors' answer tokens, which are part of
  this request's prompt, then its own), control tokens excluded (`engine.sampler.SeenTokens`,
  the engine's own rule, kept per request and extended by each new token): vLLM's built-in
  frequency/presence penalties count only a request's own output, so a child would not be
  penalized for repeating its parent;
- `rules.NoRepeatedHeads` with the tokenizer of the served model, over a view of the request
  that has what the rule reads of an engine thread (no budget planning: that needs the
  whole tree, which only the driver sees).

The driver (`vllm/driver.py`) sends the thread's facts in `vllm_xargs`; a request without
them is left alone, so the processor costs plain vLLM requests nothing. Only torch, numpy and
the standard library are imported here (and `rules` and `engine.sampler`, which need no
more), since this module runs in vLLM's venv.

Cost, measured: every APAR thread is a vLLM request, so this runs for every row of vLLM's
step, in vLLM's engine process. One head guard (`NoRepeatedHeads`) serves every request of
the processor: each guard scans the 49k-token vocabulary once (~0.18 s), and a guard per
request made that scan once per thread (~5 an answer). Penalties are counted incrementally.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ..engine.sampler import SeenTokens

# The keys the driver sets in `vllm_xargs` (all integers or floats).
XARG_KEYS = (
    "apar_answer_start",  # index in the request's prompt where the answer begins (end of the chat prompt)
    "apar_own_start",  # index in the prompt of the thread's own first token ([Child] for a child)
    "apar_child",  # 1 for a child thread
    "apar_fork",  # 1 if the thread may sample [Fork]
    "apar_fork_id", "apar_child_id", "apar_join_id", "apar_eos_id",
    "apar_frequency_penalty", "apar_presence_penalty", "apar_repetition_penalty",
    "apar_no_repeat_heads",  # 1 to apply rules.NoRepeatedHeads
)


class _ThreadView:
    """What `rules.NoRepeatedHeads` reads of an engine `Thread`, for one vLLM request."""

    def __init__(self, prompt: list[int], output: list[int], answer_start: int, own_start: int, child: bool) -> None:
        self.token_ids = prompt + output
        self.own_tokens = self.token_ids[own_start:]
        self.parent = object() if child else None
        self.children: dict = {}  # only read for budget planning, which does not run here
        self.request = SimpleNamespace(prompt_token_ids=prompt[:answer_start], params=SimpleNamespace(plan_budget=False))


def thread_rules(args: dict, tokenizer_loader, guards: dict | None = None):
    """The per-request function (prompt ids, output ids, logits row) -> logits row for a
    request whose `extra_args` are `args`, or None for a request that is not an APAR thread.
    `guards`: the head guards already built, by control tokens (shared by every request)."""
    if "apar_fork_id" not in args:
        return None
    fork, child, join, eos = (int(args[k]) for k in ("apar_fork_id", "apar_child_id", "apar_join_id", "apar_eos_id"))
    control = (fork, child, join)
    answer_start, own_start = int(args["apar_answer_start"]), int(args["apar_own_start"])
    is_child, may_fork = bool(args.get("apar_child", 0)), bool(args.get("apar_fork", 0))
    freq, pres = float(args.get("apar_frequency_penalty", 0)), float(args.get("apar_presence_penalty", 0))
    rep = float(args.get("apar_repetition_penalty", 1))
    heads = None
    if args.get("apar_no_repeat_heads", 0):
        from ..rules import NoRepeatedHeads
        from ..tokens import ControlTokens

        key = (fork, child, join, eos)
        heads = guards.get(key) if guards is not None else None
        if heads is None:
            heads = NoRepeatedHeads(ControlTokens(fork, child, frozenset({eos}), join), tokenizer_loader())
            if guards is not None:
                guards[key] = heads
    penalized = rep != 1 or freq or pres
    seen: SeenTokens | None = None  # the request's context counted so far (penalized requests)

    def apply(prompt: list[int], output: list[int], logits: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        last = output[-1] if output else prompt[-1]
        if penalized:
            if seen is None or seen.length > len(prompt) + len(output):  # first call, or an output cut back
                seen = SeenTokens(answer_start, control, repetition=rep != 1)
                seen.extend(prompt)
            seen.extend(output[seen.length - len(prompt):])  # the tokens sampled since the last call
            work = logits if logits.dtype == torch.float32 else logits.float()
            seen.penalize(work.numpy(), freq, pres, rep)
            if work is not logits:
                logits.copy_(work)
        logits[child] = float("-inf")
        logits[join] = float("-inf")
        if not may_fork or last in (fork, child):
            logits[fork] = float("-inf")
        if heads is not None:
            view = _ThreadView(prompt, output, answer_start, own_start, is_child)
            heads(view, logits)  # type: ignore[arg-type]
        return logits

    return apply


def _processor_class():
    """`APARRules` subclasses vLLM's per-request adapter; built on first use so that this
    module imports (for its tests and for `thread_rules`) where vLLM is not installed."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class APARRules(AdapterLogitsProcessor):
        """vLLM logits processor: `thread_rules` for every request that is an APAR thread."""

        def __init__(self, vllm_config, device, is_pin_memory) -> None:
            super().__init__(vllm_config, device, is_pin_memory)
            self._tokenizer_path = vllm_config.model_config.tokenizer
            self._tokenizer = None
            self._guards: dict = {}  # one head guard for every request (thread_rules)

        def _load_tokenizer(self):
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
            return self._tokenizer

        def is_argmax_invariant(self) -> bool:
            return False  # it bans tokens

        def new_req_logits_processor(self, params):
            return thread_rules(params.extra_args or {}, self._load_tokenizer, self._guards)

    return APARRules


def __getattr__(name: str):
    if name == "APARRules":
        cls = _processor_class()
        globals()["APARRules"] = cls
        return cls
    raise AttributeError(name)
