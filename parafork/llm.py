"""`LLM`: the user-facing facade over the engine, as in vLLM.

`LLM(model="bundled").generate(prompts, SamplingParams(...))`. It adds what the engine
leaves out: finding and loading the model and tokenizer, encoding prompts (chat template),
turning restored tokens into text deltas, and the generate/stream loops.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import models
from .config import EngineConfig
from .engine.engine import Engine, RequestOutput
from .engine.runner import build_runner
from .sampling import SamplingParams

# A prompt is a user message (chat template applied), a list of chat messages, or raw ids.
Prompt = Union[str, Sequence[dict], dict]


class Detokenizer:
    """Turns a request's growing final token prefix into text deltas; holds back split UTF-8."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.num_tokens = 0
        self.text = ""

    def update(self, tokens: list[int], complete: bool) -> str:
        if len(tokens) == self.num_tokens and not complete:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
        if not complete:
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character
        if not text.startswith(self.text):
            return ""  # decoding shifted earlier text (rare); wait for a stable prefix
        delta, self.text, self.num_tokens = text[len(self.text) :], text, len(tokens)
        return delta


class LLM(Engine):
    def __init__(self, model: str = "bundled", **config) -> None:
        config = EngineConfig(model=model, **config)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        path = models.resolve_model_path(model)
        self.tokenizer, control = models.load_tokenizer(path)
        self.adapter = config.adapter or models.default_adapter(model)
        super().__init__(config, build_runner(config, path, self.tokenizer, self.adapter), control)
        self._detokenizers: dict[str, Detokenizer] = {}
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return models.apply_chat_template(self.tokenizer, prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must hold 'prompt_token_ids'")
            return list(prompt["prompt_token_ids"])
        ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, stream: bool = True
    ) -> str:
        """Queues a prompt; returns its request id. With `stream=False`, outputs carry text
        only once the request has finished (the answer is restored and decoded once)."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        self.add(request_id, self.encode(prompt), params, stream)
        # Raw mode shows [Fork] markers in the text; otherwise special tokens are hidden unless asked for.
        skip = params.skip_special_tokens and params.mode != "raw"
        self._detokenizers[request_id] = Detokenizer(self.tokenizer, skip_special_tokens=skip)
        return request_id

    def abort(self, request_id: str) -> None:
        super().abort(request_id)
        self._detokenizers.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        """One engine step; the outputs carry text (final text so far, and its new part)."""
        outputs = super().step()
        for out in outputs:
            detokenizer = self._detokenizers.get(out.request_id)
            if detokenizer is None:
                continue
            if out.token_ids or out.finished:
                out.delta = detokenizer.update(out.token_ids, out.complete and out.finished)
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
