"""`LLM`: the user-facing facade over the engine, as in vLLM.

`LLM(model="bundled").generate(prompts, SamplingParams(...))`. It holds an `Engine` (`.engine`)
and adds text only: finding and loading the model and tokenizer, encoding prompts (chat
template), turning restored tokens into text deltas and stop strings, and the generate/stream
loops. Request policy (the model's sampling defaults, the head guard) is the engine's, applied
in `Engine.add`, so no way of adding a request skips it.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import models
from .config import EngineConfig
from .engine.engine import Engine
from .engine.outputs import RequestOutput
from .engine.thread import FinishReason
from .runners.factory import build_runner
from .rules import NoRepeatedHeads
from .sampling import SamplingParams

# A prompt is a user message (chat template applied), a list of chat messages, or raw ids.
Prompt = Union[str, Sequence[dict], dict]


class Detokenizer:
    """A request's restored text: decodes the growing final token prefix, finds stop strings,
    and hands out deltas that never hold a split UTF-8 character nor text that could still
    turn out to begin a stop string."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.num_tokens = 0
        self.text = ""
        self.emitted = 0  # characters of `text` handed out as deltas
        self._searched = 0  # characters of `text` searched for stop strings
        self.stopped = False

    def update(self, tokens: list[int], complete: bool) -> None:
        if self.stopped or (len(tokens) == self.num_tokens and not complete):
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
        if not complete:
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character
        if text.startswith(self.text):  # else decoding shifted earlier text (rare): wait for a stable prefix
            self.text, self.num_tokens = text, len(tokens)

    def find_stop(self) -> int | None:
        """Where the first stop string begins in the text, if one is there now."""
        if not self.stop or self.stopped:
            return None
        start = max(0, self._searched - max(map(len, self.stop)) + 1)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self._searched = len(self.text)
        return min(found) if found else None

    def cut(self, index: int, tokens: list[int]) -> int:
        """Ends the text before `index`; returns how many of `tokens` lie wholly before it."""
        self.text, self.stopped = self.text[:index], True
        lo, hi = 0, len(tokens)  # the longest token prefix whose text fits before the stop
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.tokenizer.decode(tokens[:mid], skip_special_tokens=self.skip_special_tokens)) <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def delta(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.stopped:  # hold back a tail that may begin a stop string
            end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta


class LLM:
    def __init__(self, model: str = "bundled", **config) -> None:
        config = EngineConfig(model=model, **config)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        path = models.resolve_model_path(model)
        self.tokenizer, self.control = models.load_tokenizer(path)
        self.adapter = config.adapter or models.default_adapter(model)
        runner = build_runner(config, path, self.tokenizer, self.adapter)
        self.engine = Engine(config, runner, self.control,
                             sampling_defaults=models.sampling_defaults(path, self.adapter),
                             head_guard=NoRepeatedHeads(self.control, self.tokenizer),
                             drafter=self._drafter(config, runner))
        self.config = self.engine.config
        self._detokenizers: dict[str, Detokenizer] = {}
        self._ids = itertools.count()

    def _drafter(self, config: EngineConfig, runner):
        """The trained draft head's drafter where one is asked for (`draft_head`, or
        speculative="eagle"), checked against the adapter it was trained for."""
        where = config.draft_head or ("bundled" if config.speculative == "eagle" else None)
        if where is None:
            return None
        from .draft.head import EagleHead
        from .engine.eagle import HeadDrafter
        from .engine.runner import HiddenStateRunner

        if not isinstance(runner, HiddenStateRunner):
            raise ValueError(f"speculative='eagle' needs the target's hidden states, which the {config.backend!r} "
                             "backend does not give (llama.cpp's API returns logits and embeddings only); "
                             "use backend='torch'")
        folder = models.BUNDLED_DRAFT_HEAD if where == "bundled" else Path(where)
        head = EagleHead.load(folder)
        digest = models.adapter_digest(self.adapter) if self.adapter else ""
        if head.config.target_digest != digest:
            raise ValueError(f"the draft head in {folder} was trained for adapter {head.config.target_digest or 'none'}, "
                             f"this model runs adapter {digest or 'none'}: train one for it (parafork train-draft)")
        kernel = None
        if config.torch_dtype == torch.bfloat16 and config.row_kernel:
            from .runners import row_kernel

            kernel = row_kernel.load()  # the head's linears as the target's: bf16 rows from packed weights
        drafter = HeadDrafter(head, runner.embed_tokens, self.control.fork_id,
                              set(self.control.eos_ids) | {self.control.join_id}, self.control.child_id, kernel=kernel)
        # Until the engine times a pass (engine.py, where steps are timed): its weight bytes
        # against the target's (bundled, bf16: 19.6 MB against 270 MB, 0.073).
        drafter.pass_cost = drafter.weight_bytes / runner.info.weight_bytes
        return drafter

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """What a request that leaves a penalty unset (None) gets: the model's generation_config.json."""
        return self.engine.sampling_defaults

    # The engine's read-outs, for callers that hold only the facade.
    def stats(self):
        return self.engine.stats()

    def check_idle(self) -> None:
        self.engine.check_idle()

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished_requests()

    def request_tree(self, request_id: str):
        return self.engine.request_tree(request_id)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must hold 'prompt_token_ids'")
            return list(prompt["prompt_token_ids"])
        return models.apply_chat_template(self.tokenizer, prompt)

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, stream: bool = True
    ) -> str:
        """Queues a prompt; returns its request id. With `stream=False`, outputs carry text
        only once the request has finished (the answer is restored and decoded once)."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        # Stop strings are looked for at every step, so such a request is restored at every step.
        self.engine.add(request_id, self.encode(prompt), params, stream or bool(params.stop))
        # Raw mode shows [Fork] markers in the text; otherwise special tokens are hidden unless asked for.
        skip = params.skip_special_tokens and params.mode != "raw"
        self._detokenizers[request_id] = Detokenizer(self.tokenizer, skip, params.stop)
        return request_id

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._detokenizers.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs carry text (final text so far, and its new part). A stop
        string in the restored text ends its request there: the text (and tokens, logprobs)
        end before it, `finish_reason` is "stop", and the request's threads are freed."""
        outputs = self.engine.step()
        for out in outputs:
            detokenizer = self._detokenizers.get(out.request_id)
            if detokenizer is None:
                continue
            if out.token_ids or out.finished:
                detokenizer.update(out.token_ids, out.complete and out.finished)
            stop_at = detokenizer.find_stop()
            if stop_at is not None:
                kept = detokenizer.cut(stop_at, out.token_ids)
                out.token_ids = out.token_ids[:kept]
                out.logprobs = out.logprobs[:kept] if out.logprobs is not None else None
                if not out.finished:
                    self.engine.abort(out.request_id, FinishReason.STOP)  # the detokenizer stays until below
                out.finished, out.finish_reason, out.complete = True, "stop", True
            out.delta = detokenizer.delta(out.finished)
            out.text = detokenizer.text
            if out.finished:
                del self._detokenizers[out.request_id]
        return outputs

    def _add_all(self, prompts: Prompt | Sequence[Prompt], params, stream: bool) -> list[str]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p, stream=stream))
        except Exception:
            for request_id in ids:
                self.abort(request_id)
            raise
        return ids

    def stream(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[RequestOutput]:
        """Yields outputs whenever a request has new final text or finishes, in reading order.

        Closing the iterator early aborts the requests it started.
        """
        pending = set(self._add_all(prompts, params, stream=True))
        try:
            while pending:
                for out in self.step():
                    if out.request_id in pending and (out.delta or out.finished):
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for request_id in pending:
                self.abort(request_id)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs the prompts to completion (batched together); outputs in prompt order."""
        ids = self._add_all(prompts, params, stream=False)
        order = {request_id: i for i, request_id in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            try:
                while any(r is None for r in results):
                    for out in self.step():
                        if out.finished and out.request_id in order:
                            results[order[out.request_id]] = out
                            bar.update(1)
            finally:
                for request_id in ids:
                    self.abort(request_id)
        return results  # type: ignore[return-value]
