"""APAR on an existing OpenAI-compatible completion server (vLLM, SGLang, llama.cpp, parafork).

Each thread is a series of completion requests whose prompt is the thread's whole text
(chat prompt, its ancestors up to its fork, then its own text), with control tokens
written out as `[Fork]`/`[Child]` so the server's tokenizer maps them to their ids. All
live threads' requests go out at once each round; the server batches them, and its prefix
cache keeps the shared prefixes cheap. When a reply contains `[Fork]`, the thread keeps
what came before it and continues after it, a child starts from there with `[Child]`, and
the rest of the reply is dropped (it was written as if no fork happened). Servers need
to render special tokens in the text (`skip_special_tokens: false` for vLLM; parafork's
`mode: raw`) and honour `logit_bias` (used to ban `[Fork]` where APAR forbids it).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .tokens import CHILD, FORK


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
    rounds: int  # rounds of parallel requests (one request per live thread each)
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
        max_threads: int = 16,
        max_depth: int = 2,
        fork_bias: float = 0.0,
        timeout: float = 120.0,
    ) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self.model, self.tokenizer, self.chunk = model, tokenizer, chunk
        self.max_threads, self.max_depth, self.fork_bias = max_threads, max_depth, fork_bias
        self.fork_id = tokenizer.convert_tokens_to_ids(FORK)
        self.child_id = tokenizer.convert_tokens_to_ids(CHILD)

    def _may_fork(self, thread: RemoteThread, num_threads: int) -> bool:
        return (
            bool(thread.text)
            and not thread.text.endswith(FORK)
            and thread.depth + 1 < self.max_depth
            and num_threads < self.max_threads
        )

    def _complete(self, prompt: str, max_tokens: int, allow_fork: bool, mode: str) -> tuple[str, str, int]:
        bias = {str(self.child_id): -100}
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

    def generate(self, prompt: str, max_tokens: int = 512) -> RemoteOutput:
        start = time.perf_counter()
        root = RemoteThread(self.chat_prompt(prompt), depth=0)
        threads, used, rounds = [root], 0, 0
        with ThreadPoolExecutor(max_workers=self.max_threads) as pool:
            while used < max_tokens and any(not t.finished for t in threads):
                rounds += 1
                live = [t for t in threads if not t.finished]
                chunk = max(1, min(self.chunk, (max_tokens - used) // len(live)))
                jobs = [
                    (t, pool.submit(self._complete, t.prefix + t.text, chunk, self._may_fork(t, len(threads)), "raw"))
                    for t in live
                ]
                for thread, job in jobs:
                    text, reason, n = job.result()
                    used += n
                    if FORK in text and len(threads) < self.max_threads:
                        thread.text += text[: text.index(FORK)] + FORK
                        child = RemoteThread(thread.prefix + thread.text + CHILD, thread.depth + 1)
                        thread.children.append(child)
                        threads.append(child)
                    else:
                        thread.text += text.replace(FORK, "")
                        thread.finished = reason == "stop"
        return RemoteOutput(root.restore(), len(threads), rounds, used, time.perf_counter() - start)
