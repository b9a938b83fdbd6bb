"""The control tokens of APAR and their registration on a tokenizer.

`[Fork]` is sampled by the model after the head of an independent part; the engine
then starts a child thread whose first token is `[Child]` (forced, never sampled).
`[Join]` is sampled by a thread that has forked: it waits until the children it forked
since its previous join have finished, and from `[Join]` on it also attends to their
tokens (engine/thread.py, `Join`). A model that was not trained on joins never samples it
(requests decode with `SamplingParams.join` off unless the model asks for it).
"""
from __future__ import annotations

from dataclasses import dataclass

FORK = "[Fork]"
CHILD = "[Child]"
JOIN = "[Join]"


@dataclass(frozen=True)
class ControlTokens:
    fork_id: int
    child_id: int
    eos_ids: frozenset[int]
    join_id: int

    @property
    def ids(self) -> tuple[int, int, int]:
        """[Fork], [Child], [Join]: never penalized, never restored as text."""
        return (self.fork_id, self.child_id, self.join_id)


def register_control_tokens(tokenizer) -> ControlTokens:
    """Adds `[Fork]`/`[Child]`/`[Join]` as special tokens (idempotent, in that order after
    the vocabulary) and returns their ids."""
    missing = [t for t in (FORK, CHILD, JOIN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    fork_id = tokenizer.convert_tokens_to_ids(FORK)
    child_id = tokenizer.convert_tokens_to_ids(CHILD)
    join_id = tokenizer.convert_tokens_to_ids(JOIN)
    eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    # ChatML models end a turn with <|im_end|>; treat it as end of thread too.
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    if im_end is not None:
        eos_ids = eos_ids | {im_end}
    return ControlTokens(fork_id=fork_id, child_id=child_id, eos_ids=eos_ids, join_id=join_id)
