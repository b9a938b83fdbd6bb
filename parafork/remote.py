"""APAR on an existing OpenAI-compatible completion server (vLLM, SGLang, llama.cpp, parafork).

Each thread is a series of completion requests whose prompt is the thread's whole text
(chat prompt, its ancestors up to its fork, then its own text), with control tokens
written out as `[Fork]`/`[Child]` so the server's tokenizer maps them to their ids. The
server batches the live threads' requests, and its prefix cache keeps the shared prefixes
cheap. When a reply contains `[Fork]`, the thread keeps
what came before it and continues after it, a child starts from there with `[Child]`, and
the rest of the reply is dropped (it was written as if no fork happened). Replies are
handled as they arrive; each thread's next request goes out at once. Servers must print
the control tokens in completions (`parafork export` writes them as plain added tokens;
parafork's own server uses `mode: raw`) and honour `logit_bias` (used to ban `[Fork]`
where APAR forbids it).
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .tokens import CHILD, FORK, JOIN


@dataclass
class RemoteThread:
    prefix: str  # what comes before this thread's own text
    depth: int
    text: str = ""  # own text, with FORK where each child was born
    children: list[RemoteThread] = field(default_factory=list)
    finished: bool = False

    def restore(self) -> str:
        """Own text with each FORK replaced by that child's restored text."""
        pieces = self.text.split(FORK)
        out = [pieces[0]]
        for child, piece in zip(self.children, pieces[1:]):
            out += [child.restore(), piece]
        return "".join(out)


@dataclass
class RemoteOutput:
    text: str
    threads: int
    requests: int  # completion requests sent
    completion_tokens: int  # tokens the server generated, dropped ones included
    seconds: float


class RemoteAPAR:
    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer,
        api_key: str | None = None,
        chunk: int = 16,
        body_chunk: int = 128,
        max_threads: int = 16,
        max_depth: int = 2,
        fork_bias: float = 0.0,
        timeout: float = 120.0,
    ) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        # A thread that may fork asks for `chunk` tokens at a time: what follows a [Fork] in a
        # reply is dropped. One that may not (depth or thread cap) asks for `body_chunk`.
        self.model, self.tokenizer, self.chunk, self.body_chunk = model, tokenizer, chunk, body_chunk
        self.max_threads, self.max_depth, self.fork_bias = max_threads, max_depth, fork_bias
        self.fork_id = tokenizer.convert_tokens_to_ids(FORK)
        self.child_id = tokenizer.convert_tokens_to_ids(CHILD)
        self.join_id = tokenizer.convert_tokens_to_ids(JOIN)  # never sampled here: the driver does not join

    def _next_request(self, thread: RemoteThread, num_threads: int) -> tuple[int, bool]:
        """(tokens to ask for, whether [Fork] is allowed). A thread may not fork before its
        first token nor right after a fork; the ban holds for a whole reply, so that one
        token is asked for alone, and the thread's next reply may fork again."""
        if thread.depth + 1 >= self.max_depth or num_threads >= self.max_threads:
            return self.body_chunk, False
        if not thread.text or thread.text.endswith(FORK):
            return 1, False
        return self.chunk, True

    def _complete(self, prompt: str, max_tokens: int, allow_fork: bool, mode: str) -> tuple[str, str, int]:
        bias = {str(self.child_id): -100, str(self.join_id): -100}
        bias[str(self.fork_id)] = self.fork_bias if allow_fork else -100
        r = self.client.completions.create(
            model=self.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            logit_bias=bias,
            extra_body={"skip_special_tokens": False, "parafork": {"mode": mode}},
        )
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    def chat_prompt(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def generate_ar(self, prompt: str, max_tokens: int = 512) -> RemoteOutput:
        """Plain AR through the same server, for comparison."""
        start = time.perf_counter()
        text, _, used = self._complete(self.chat_prompt(prompt), max_tokens, False, "ar")
        return RemoteOutput(text, 1, 1, used, time.perf_counter() - start)

    def generate(self, prompt: str, max_tokens: int = 512, parallel: bool = True) -> RemoteOutput:
        """APAR over the server. Every thread has its own series of requests, sent as soon as
        its last one returns (no lock-step rounds: a long body never holds up the parent's
        next head). `max_tokens` bounds the tokens generated over all threads, dropped ones
        included: requests only reserve what is left of it. `parallel=False` sends one
        request at a time: the same tree at AR's pace, the fair baseline for the speed-up."""
        start = time.perf_counter()
        root = RemoteThread(self.chat_prompt(prompt), depth=0)
        threads, ready = [root], [root]
        in_flight: dict[Future, tuple[RemoteThread, int]] = {}
        used = reserved = requests = 0
        with ThreadPoolExecutor(max_workers=self.max_threads if parallel else 1) as pool:
            while ready or in_flight:
                while ready and used + reserved < max_tokens:
                    thread = ready.pop(0)
                    size, may_fork = self._next_request(thread, len(threads))
                    # A fair share of what is left, so one long body does not starve the others.
                    unreserved = max_tokens - used - reserved
                    unfinished = sum(not t.finished for t in threads)
                    n = min(size, unreserved, max(1, unreserved // unfinished))
                    job = pool.submit(self._complete, thread.prefix + thread.text, n, may_fork, "raw")
                    in_flight[job] = (thread, n)
                    reserved += n
                    requests += 1
                if not in_flight:
                    break  # the budget is spent; threads still waiting stay cut short
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for job in done:
                    thread, n = in_flight.pop(job)
                    reserved -= n
                    text, reason, got = job.result()
                    used += got
                    if FORK in text and len(threads) < self.max_threads:
                        thread.text += text[: text.index(FORK)] + FORK
                        child = RemoteThread(thread.prefix + thread.text + CHILD, thread.depth + 1)
                        thread.children.append(child)
                        threads.append(child)
                        ready += [thread, child]
                    else:
                        thread.text += text.replace(FORK, "")
                        thread.finished = reason == "stop"
                        if not thread.finished:
                            ready.append(thread)
        return RemoteOutput(root.restore(), len(threads), requests, used, time.perf_counter() - start)
