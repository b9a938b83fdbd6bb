"""The engine loop and the user-facing `LLM` API.

One step: the scheduler picks every live thread's pending tokens, the model runner
computes their logits in one forward, the APAR rules and the sampler choose one token per
thread, and the results grow the request trees: a `[Fork]` starts a child (sharing the
parent's KV blocks), an end token finishes only its thread and frees its blocks at once.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import models
from ..config import EngineConfig
from ..restore import linearize
from ..sampling import FORKING_MODES, SamplingParams, apply_apar_rules, sample
from .block_manager import BlockManager
from .hf_runner import HFRunner
from .model_runner import SUPPORTED_ARCHITECTURES, ModelRunner, ThreadSlice
from .scheduler import Scheduler, finish_unservable
from .thread import FinishReason, Request, Thread

log = logging.getLogger(__name__)

# A prompt is a user message (chat template applied), a list of chat messages, or raw ids.
Prompt = Union[str, Sequence[dict], dict]


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
    error: str | None = None


class _Detokenizer:
    """Turns the growing final token prefix into text deltas; holds back split UTF-8."""

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


class LLM:
    """`LLM(model="bundled").generate(prompts, SamplingParams(...))`, as in vLLM."""

    def __init__(self, model: str = "bundled", **config) -> None:
        self.config = EngineConfig(model=model, **config)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        path = models.resolve_model_path(model)
        self.tokenizer, self.control = models.load_tokenizer(path)
        adapter = self.config.adapter or models.default_adapter(model)
        self.adapter = adapter
        hf_model = models.load_hf_model(path, self.tokenizer, torch.float32, adapter=adapter)
        max_len = self.config.max_model_len or hf_model.config.max_position_embeddings
        self.config.max_model_len = max_len
        arch = (hf_model.config.architectures or ["?"])[0]
        if self.config.backend == "native" or (self.config.backend == "auto" and arch in SUPPORTED_ARCHITECTURES):
            self.runner = ModelRunner(
                hf_model, self.config.num_kv_blocks, self.config.block_size, self.config.torch_dtype, max_len
            )
        else:
            log.warning("%s runs on the slow HF fallback backend (recomputes contexts every step)", arch)
            self.runner = HFRunner(hf_model, self.config.num_kv_blocks, self.config.block_size, self.config.torch_dtype)
        del hf_model
        self.blocks = BlockManager(self.config.num_kv_blocks, self.config.block_size, self.config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.config.max_batch_tokens)
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, _Detokenizer] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.total_steps = 0

    # ---- requests -------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return models.apply_chat_template(self.tokenizer, prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a dict prompt must hold 'prompt_token_ids'")
            ids = list(prompt["prompt_token_ids"])
            if not all(isinstance(i, int) and 0 <= i < self.runner.vocab_size for i in ids):
                raise ValueError("prompt_token_ids must be token ids of this model's vocabulary")
            return ids
        messages = list(prompt)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, stream: bool = True
    ) -> str:
        """Queues a prompt. With `stream=False`, outputs carry text only once the request
        has finished, which spares detokenizing the growing answer at every step."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {self.config.max_model_len - 1}")
        if -(-(len(ids) + 1) // self.config.block_size) > self.config.num_kv_blocks:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the whole KV pool holds")
        if params.logit_bias and max(params.logit_bias) >= self.runner.vocab_size:
            raise ValueError(f"logit_bias names a token id beyond the vocabulary ({self.runner.vocab_size})")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, ids, params, next(self._arrivals))
        request.streaming = stream
        self.requests[request_id] = request
        # Raw mode shows [Fork] markers in the text; otherwise special tokens are hidden.
        self._detok[request_id] = _Detokenizer(self.tokenizer, skip_special_tokens=params.mode != "raw")
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancels a request; its KV blocks return to the pool at once."""
        request = self.requests.pop(request_id, None)
        self._detok.pop(request_id, None)
        if request is not None and not request.finished:
            self._finish_request(request, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # ---- the step -------------------------------------------------------------------
    def _finish_thread(self, thread: Thread, reason: FinishReason) -> None:
        thread.finish_reason = reason
        self.scheduler.release(thread)

    def _finish_request(self, request: Request, reason: FinishReason) -> None:
        for thread in request.live_threads:
            thread.finish_reason = reason
        request.finish_reason = request.finish_reason or reason
        self.scheduler.remove(request)

    def _apply_token(self, thread: Thread, token: int) -> None:
        request, params, control = thread.request, thread.request.params, self.control
        thread.token_ids.append(token)
        request.num_generated += 1
        if token == control.fork_id and params.mode in FORKING_MODES:
            child = request.fork(thread, control.child_id)
            request.num_generated += 1
            copy = self.blocks.fork(thread, child)
            if copy is not None:
                self.runner.copy_block(*copy)
        elif token in control.eos_ids and not params.ignore_eos:
            self._finish_thread(thread, FinishReason.STOP)
        elif len(thread.token_ids) >= self.config.max_model_len:
            self._finish_thread(thread, FinishReason.LENGTH)

    def step(self) -> list[RequestOutput]:
        """Runs one forward over all scheduled threads; returns outputs of the requests touched."""
        batch, unservable = self.scheduler.schedule()
        touched: dict[str, Request] = {}
        for request in unservable:
            finish_unservable(request, self.config.num_kv_blocks)
            self._finish_request(request, request.finish_reason)
            touched[request.request_id] = request
        if not batch.threads:
            return [self._output(r) for r in touched.values()]
        slices = [
            ThreadSlice(t.pending[:n], t.num_cached, t.block_table) for t, n in zip(batch.threads, batch.num_tokens)
        ]
        logits = self.runner.forward(slices)
        self.total_steps += 1
        rows, ready = [], []
        for i, (thread, n) in enumerate(zip(batch.threads, batch.num_tokens)):
            # Token k (0-based position) attends to k + 1 keys; this slice holds positions c..c+n-1.
            thread.request.attention_work += n * thread.num_cached + n * (n + 1) // 2
            thread.num_cached += n
            self.blocks.register(thread)
            if thread.num_cached == len(thread.token_ids):  # whole context fed: sample
                rows.append(i)
                ready.append(thread)
        for thread in batch.threads:
            touched[thread.request.request_id] = thread.request
        if ready:
            logits = logits[rows]
            apply_apar_rules(logits, ready, self.control)
            for i, thread in enumerate(ready):
                for rule in thread.request.params.logits_rules:
                    rule(thread, logits[i])
            for thread, token in zip(ready, sample(logits, ready)):
                self._apply_token(thread, token)
        for request in touched.values():
            if request.finished:
                continue
            request.num_steps += 1
            request.peak_blocks = max(request.peak_blocks, len(request.blocks_in_use()))
            if request.num_generated >= request.params.max_tokens:
                self._finish_request(request, FinishReason.LENGTH)
            elif not request.live_threads:
                self._finish_request(request, FinishReason.STOP)
        return [self._output(r) for r in touched.values()]

    def _output(self, request: Request) -> RequestOutput:
        detok = self._detok[request.request_id]
        tokens: list[int] = []
        delta = ""
        if request.streaming or request.finished:
            tokens, complete = linearize(request.root, self.control, final_only=True)
            delta = detok.update(tokens, complete and request.finished)
        if request.finished:
            # Finished requests leave the engine; their outputs carry everything needed.
            self.requests.pop(request.request_id, None)
            self._detok.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            text=detok.text,
            delta=delta,
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
            error=request.error,
        )

    # ---- convenience ----------------------------------------------------------------
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
