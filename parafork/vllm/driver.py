"""APAR on real vLLM: every thread is one streaming request to vLLM's OpenAI server.

Fork token -> thread -> vLLM request -> restored text, as in parafork's engine:

- A thread is one completion request whose prompt is token ids (its ancestors' tokens up to
  and including its `[Fork]`, then `[Child]`; the chat prompt for the root), streamed with
  the token ids it samples (`return_token_ids`), so nothing is re-tokenized.
- A parent does not stop at `[Fork]`: its request runs on and writes the next head while
  the driver opens the child's request at once. vLLM's prefix cache holds the parent's full
  KV blocks, so a child re-prefills only the tokens of the parent's last, partial block and
  its own `[Child]` (measured per answer: `DriverOutput.prefilled_tokens`); vLLM's block
  size sets that cost (`vllm/server.py` picks the smallest vLLM's CPU attention accepts).
- APAR's rules for each request (`[Fork]` where allowed, `[Child]`/`[Join]` never,
  penalties over what the thread sees, `rules.NoRepeatedHeads`) run inside vLLM, in
  `plugin.APARRules`, from facts the driver sends in `vllm_xargs`.
- The answer is restored with `restore.linearize` and streamed in reading order; stop
  strings end it there (`llm.Detokenizer`). Ending early (budget, stop string, a closed
  stream) cancels every open request of the tree: vLLM aborts a request whose stream closes.

Modes as in the engine: `apar` (threads side by side), `serial` (the same tree, one request
at a time: a parent's request stops at `[Fork]` and resumes after the child's end, so its
resumption re-prefills its last partial block), `ar` (vLLM's own decoding: one plain request,
control tokens banned by `logit_bias`, vLLM's built-in penalties, no plugin), `raw` (one
request, `[Fork]` stays in the text).

Refused, with the reason: joins (vLLM's requests cannot attend to each other's KV),
`plan_budget` (the budget planner needs the whole tree in one scheduler: over vLLM
`max_tokens` is a hard cap over all threads, counted as tokens arrive, so where it runs
out depends on arrival order), `logprobs`, `speculative` (vLLM has its own), Python
`logits_rules` (they cannot travel to vLLM's process). `max_threads` caps the requests open
at once: a child forked beyond it waits for a thread to end (the engine bans `[Fork]` there
instead; the bundled model forks ~5 threads an answer, under the default 16).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from ..llm import Detokenizer
from ..restore import linearize
from ..sampling import FORKING_MODES, PENALTIES, SamplingParams
from ..tokens import ControlTokens


@dataclass(eq=False)
class DriverThread:
    """One APAR thread; fits `restore.TreeNode`."""

    prefix: list[int]  # the tokens before its own: the chat prompt, or the parent's through its [Fork]
    own_tokens: list[int]  # [Child] first for a child, then what vLLM sampled (end token not kept)
    depth: int = 0
    children: dict[int, DriverThread] = field(default_factory=dict)  # own index of a [Fork] -> child
    finished: bool = False  # ended with an end token (or by a stop string's cut)


@dataclass
class DriverOutput:
    text: str  # restored answer in reading order (streaming: final text so far)
    delta: str  # text that became final since the previous output
    token_ids: list[int]  # restored answer tokens, no control tokens
    finished: bool
    finish_reason: str | None  # "stop" (end tokens or a stop string), "length" (max_tokens over all threads)
    num_generated_tokens: int  # over all threads, control tokens included, as the engine counts
    num_threads: int
    num_requests: int  # vLLM requests sent
    prompt_tokens: int  # prompt tokens over all requests
    prefilled_tokens: int  # of which vLLM computed (not found in its prefix cache); -1 where vLLM did not say
    child_prompt_tokens: int  # prompt tokens of the children's first requests (what the forks sent)
    child_prefilled_tokens: int  # of those that reported usage, what vLLM computed: the forks' cost; -1: not said
    child_requests_reported: int  # children's first requests whose usage came back (a cancelled one sends none)
    seconds: float
    requests_unforked: int = 0  # requests sent with [Fork] banned: the driver had fork_limit or more open


class _Tree:
    """One answer's state while its requests run (lives on the driver's event loop)."""

    def __init__(self, root: DriverThread, params: SamplingParams) -> None:
        self.root, self.params = root, params
        self.prompt_len = len(root.prefix)  # where the answer begins in every request's prompt
        self.threads = [root]
        self.used = 0  # tokens generated over all threads
        self.requests = self.prompt_tokens = self.prefilled = 0
        self.child_prompt_tokens = self.child_prefilled = self.child_reported = 0
        self.prefill_known = True
        self.length = False  # the budget ran out (or a request hit the model's context)
        self.changed = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.waiting: list[DriverThread] = []  # children beyond max_threads open requests
        self.error: BaseException | None = None
        self.arrival = 0  # the driver's count of answers before this one (vLLM priority, tree_priority)
        self.unforked = 0  # requests sent with [Fork] banned for load (VLLMDriver.fork_limit)

    def left(self) -> int:
        return self.params.max_tokens - self.used

    @property
    def done(self) -> bool:
        return not self.tasks and not self.waiting


class VLLMDriver:
    """APAR over a vLLM OpenAI-compatible server (`server.VLLMServer` starts one).

    `generate` / `stream` take a prompt (a user message, chat messages or token ids) and
    `SamplingParams`; `sampling_defaults` (penalties left at None) as `LLM.sampling_defaults`.

    `tree_priority`: every request of an answer carries vLLM's `priority` = the answer's
    arrival number (the server must run `--scheduling-policy priority`, as `VLLMServer` does by
    default). vLLM then preempts the running request with the largest (priority, arrival):
    the youngest answer's threads, all of them before any of an older answer's, instead of
    the newest request, which under APAR is usually an older answer's fresh child; and it
    admits an older answer's children before younger answers' roots (the APAR paper's
    group scheduling). Off, every request has priority 0 (a server without the policy
    refuses any other value).

    `fork_limit`: a request is sent with `[Fork]` banned when the driver already has this
    many vLLM requests open (all answers together), as vLLM turns its own speculative
    decoding off above a batch size. Why: on vLLM every fork costs a request whose prompt
    re-prefills the parent's last partial KV block (block size 32 on CPU: ~16 tokens) and its
    `[Child]`, extra rows that are nearly free while vLLM's batch is small and cost as much as
    decoding once its step is compute-bound; there a thread that does not fork writes the
    item inline, as AR does. Requests already forked run on; the decision is per request,
    when it is sent, and counted (`DriverOutput.requests_unforked`). None: forks are never
    banned for load.
    """

    def __init__(self, base_url: str, model: str, tokenizer, control: ControlTokens,
                 sampling_defaults: dict | None = None, api_key: str | None = None, timeout: float = 600.0,
                 tree_priority: bool = False, fork_limit: int | None = None) -> None:
        if fork_limit is not None and fork_limit < 1:
            raise ValueError(f"fork_limit must be at least 1 open request (got {fork_limit}); None turns it off")
        self.base_url, self.api_key, self.timeout = base_url, api_key or "none", timeout
        self.tree_priority, self.fork_limit = tree_priority, fork_limit
        self.open_requests = 0  # vLLM requests in flight, all answers (fork_limit)
        self._arrivals = itertools.count()
        self._client, self._loop = None, None
        self.model, self.tokenizer, self.control = model, tokenizer, control
        self.sampling_defaults = sampling_defaults or {}

    # -- requests ---------------------------------------------------------------------------

    @property
    def client(self):
        """The official `openai` async client, one per event loop (its connections belong to one)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import openai

            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                              max_retries=0)
            self._loop = loop
        return self._client

    def encode(self, prompt) -> list[int]:
        from ..models import apply_chat_template

        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        return apply_chat_template(self.tokenizer, prompt)

    def resolve(self, params: SamplingParams | None) -> SamplingParams:
        """The params with the model's defaults, or a ValueError naming what vLLM cannot do."""
        params = (params or SamplingParams(plan_budget=False)).with_defaults(self.sampling_defaults)
        refused = {
            "join": params.joins and "joins attend to other threads' KV, which vLLM's requests cannot share",
            "plan_budget": params.plan_budget and params.mode in FORKING_MODES and (
                "budget planning needs the whole tree in one scheduler (parafork's engine); over vLLM "
                "max_tokens is a hard cap over all threads: pass plan_budget=False"),
            "logprobs": params.logprobs is not None and "not available through the vLLM driver",
            "speculative": params.speculative == "ngram" and "use vLLM's own speculative decoding (its server options)",
            "logits_rules": bool(params.logits_rules) and "Python rules cannot travel to vLLM's process",
        }
        problems = [f"{name}: {why}" for name, why in refused.items() if why]
        if problems:
            raise ValueError("the vLLM driver cannot serve this request: " + "; ".join(problems))
        return params

    def _body(self, tree: _Tree, thread: DriverThread, stop_at_fork: bool, index: int, loaded: bool = False) -> dict:
        """The request's extra fields; `loaded`: [Fork] banned for load (`fork_limit`)."""
        p, c = tree.params, self.control
        eos = min(c.eos_ids)
        bias = {str(k): float(v) for k, v in (p.logit_bias or {}).items()}
        body: dict = {
            "return_token_ids": True,
            "skip_special_tokens": False,
            "ignore_eos": p.ignore_eos,
            "stream_options": {"include_usage": True},
        }
        if p.mode == "ar":
            # vLLM's own decoding: no plugin; control tokens banned by bias; its penalties (over
            # the request's output, i.e. the answer: what the engine counts for a lone thread).
            bias.update({str(t): -100.0 for t in c.ids})
            body.update(frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                        repetition_penalty=p.repetition_penalty)
        else:
            may_fork = p.mode == "raw" or (p.mode in FORKING_MODES and thread.depth + 1 < p.max_depth and not loaded)
            body["vllm_xargs"] = {
                "apar_answer_start": tree.prompt_len, "apar_own_start": len(thread.prefix), "apar_child": int(thread.depth > 0),
                "apar_fork": int(may_fork), "apar_fork_id": c.fork_id, "apar_child_id": c.child_id,
                "apar_join_id": c.join_id, "apar_eos_id": eos,
                **{f"apar_{name}": float(getattr(p, name)) for name in PENALTIES},
                "apar_no_repeat_heads": int(p.no_repeat_heads and p.mode in FORKING_MODES),
            }
        if stop_at_fork:
            body["stop_token_ids"] = [c.fork_id]
        if bias:
            body["logit_bias"] = bias
        if p.seed is not None:
            body["seed"] = p.seed + index  # one stream of draws per thread, as the engine keeps
        if self.tree_priority:
            body["priority"] = tree.arrival  # the whole tree's: see the class docstring
        return body

    async def _request(self, tree: _Tree, thread: DriverThread, stop_at_fork: bool) -> str | None:
        """One vLLM request continuing `thread`; returns its finish reason (None: cut by the budget)."""
        n = tree.left()
        if n <= 0:
            tree.length = True
            return None
        p = tree.params
        prompt = thread.prefix + thread.own_tokens
        index = tree.threads.index(thread)
        forked_now = thread.depth > 0 and len(thread.own_tokens) == 1  # a child's first request: what a fork costs
        loaded = p.mode in FORKING_MODES and self.fork_limit is not None and self.open_requests >= self.fork_limit
        tree.unforked += loaded
        self.open_requests += 1
        try:
            stream = await self.client.completions.create(
                model=self.model, prompt=prompt, max_tokens=n, temperature=p.temperature, top_p=p.top_p,
                stream=True, extra_body=self._body(tree, thread, stop_at_fork, index, loaded),
            )
        except BaseException:
            self.open_requests -= 1
            raise
        tree.requests += 1
        tree.child_prompt_tokens += len(prompt) if forked_now else 0
        finish = stop_reason = None
        try:
            async for chunk in stream:
                if chunk.usage is not None:
                    details = chunk.usage.prompt_tokens_details
                    computed = chunk.usage.prompt_tokens - (details.cached_tokens or 0) if details is not None else 0
                    tree.prefill_known &= details is not None and details.cached_tokens is not None
                    tree.prompt_tokens += chunk.usage.prompt_tokens
                    tree.prefilled += computed
                    if forked_now:
                        tree.child_reported += 1
                        tree.child_prefilled += computed
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                for token in (choice.model_extra or {}).get("token_ids") or []:
                    if tree.left() <= 0:
                        tree.length = True
                        return None
                    tree.used += 1
                    if token in self.control.eos_ids and not p.ignore_eos:
                        continue  # never fed, never restored
                    thread.own_tokens.append(token)
                    if token == self.control.fork_id and p.mode in FORKING_MODES and not stop_at_fork:
                        self._fork(tree, thread)
                tree.changed.set()
                if choice.finish_reason is not None:
                    finish, stop_reason = choice.finish_reason, (choice.model_extra or {}).get("stop_reason")
        finally:
            self.open_requests -= 1
            await stream.close()
        if stop_at_fork and finish == "stop" and stop_reason == self.control.fork_id and (
                not thread.own_tokens or thread.own_tokens[-1] != self.control.fork_id):
            thread.own_tokens.append(self.control.fork_id)  # in case vLLM leaves the stop token out
        if finish == "length":
            tree.length = True
        return finish

    def _new_child(self, tree: _Tree, parent: DriverThread) -> DriverThread:
        """The child born at `parent`'s last token, a `[Fork]`: its context through it, then `[Child]`."""
        child = DriverThread(parent.prefix + parent.own_tokens, [self.control.child_id], parent.depth + 1)
        parent.children[len(parent.own_tokens) - 1] = child
        tree.threads.append(child)
        return child

    def _fork(self, tree: _Tree, parent: DriverThread) -> DriverThread:
        child = self._new_child(tree, parent)
        if len(tree.tasks) < tree.params.max_threads:
            self._start(tree, self._run_apar(tree, child))
        else:
            tree.waiting.append(child)
        return child

    def _start(self, tree: _Tree, coro) -> None:
        task = asyncio.create_task(coro)
        tree.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            tree.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and tree.error is None:
                tree.error = t.exception()
            while tree.waiting and len(tree.tasks) < tree.params.max_threads and tree.error is None:
                self._start(tree, self._run_apar(tree, tree.waiting.pop(0)))
            tree.changed.set()

        task.add_done_callback(done)

    async def _run_apar(self, tree: _Tree, thread: DriverThread) -> None:
        finish = await self._request(tree, thread, stop_at_fork=False)
        thread.finished = finish == "stop"

    async def _run_serial(self, tree: _Tree, thread: DriverThread) -> None:
        while True:
            finish = await self._request(tree, thread, stop_at_fork=True)
            if finish == "stop" and thread.own_tokens and thread.own_tokens[-1] == self.control.fork_id \
                    and len(thread.own_tokens) - 1 not in thread.children:
                await self._run_serial(tree, self._new_child(tree, thread))
                if tree.length:
                    return
                continue
            thread.finished = finish == "stop"
            return

    # -- answers ----------------------------------------------------------------------------

    async def stream(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[DriverOutput]:
        """Yields outputs whenever new text is final in reading order, and once finished.
        Closing the iterator cancels every open vLLM request of the answer."""
        params = self.resolve(params)
        prompt_ids = self.encode(prompt)
        start = time.perf_counter()
        root = DriverThread(prompt_ids, [])
        tree = _Tree(root, params)
        tree.arrival = next(self._arrivals)
        detokenizer = Detokenizer(self.tokenizer, params.skip_special_tokens, params.stop)
        runner = self._run_serial if params.mode == "serial" else self._run_apar
        self._start(tree, runner(tree, root))
        finish_reason = None
        try:
            while True:
                await tree.changed.wait()
                tree.changed.clear()
                if tree.error is not None:
                    raise tree.error
                if params.mode == "raw":
                    tokens = [t for t in root.own_tokens if t not in (self.control.child_id, self.control.join_id)]
                    complete = root.finished
                else:
                    tokens, complete = linearize(root, self.control, final_only=True)
                finished = tree.done or tree.length
                detokenizer.update(tokens, complete and finished)
                stop_at = detokenizer.find_stop()
                if stop_at is not None:
                    tokens = tokens[: detokenizer.cut(stop_at, tokens)]
                    finished, finish_reason = True, "stop"
                elif finished:
                    finish_reason = "length" if tree.length or not complete else "stop"
                delta = detokenizer.delta(finished)
                if delta or finished:
                    yield DriverOutput(
                        text=detokenizer.text, delta=delta, token_ids=list(tokens), finished=finished,
                        finish_reason=finish_reason, num_generated_tokens=tree.used, num_threads=len(tree.threads),
                        num_requests=tree.requests, prompt_tokens=tree.prompt_tokens,
                        prefilled_tokens=tree.prefilled if tree.prefill_known else -1,
                        child_prompt_tokens=tree.child_prompt_tokens,
                        child_prefilled_tokens=tree.child_prefilled if tree.prefill_known else -1,
                        child_requests_reported=tree.child_reported,
                        seconds=time.perf_counter() - start, requests_unforked=tree.unforked,
                    )
                if finished:
                    return
        finally:
            tasks = list(tree.tasks)
            tree.waiting.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def generate_async(self, prompt, params: SamplingParams | None = None) -> DriverOutput:
        last = None
        async for out in self.stream(prompt, params):
            last = out
        assert last is not None and last.finished
        # The usage of requests cancelled at the end arrives with their last chunk or never.
        return last

    def generate(self, prompt, params: SamplingParams | None = None) -> DriverOutput:
        """One answer, blocking (a fresh event loop; use `generate_async` inside one)."""
        return self.run(self.generate_async(prompt, params))

    def run(self, coro):
        """Runs `coro` (that uses this driver) on a fresh event loop, closing its connections after."""
        async def main():
            try:
                return await coro
            finally:
                if self._client is not None:
                    await self._client.close()
                self._client = self._loop = None

        return asyncio.run(main())


def driver_params(**kwargs) -> SamplingParams:
    """`SamplingParams` for the vLLM driver: budget planning off (see the module's note)."""
    return replace(SamplingParams(plan_budget=False), **kwargs)
