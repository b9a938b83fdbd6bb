"""parafork: auto-parallel auto-regressive (APAR) decoding.

The public names load on first use, so that a submodule which needs only torch (the
logits processor that `parafork.vllm.plugin` puts inside vLLM's own process and venv)
imports without the engine's dependencies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.outputs import RequestOutput
    from .llm import LLM
    from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_WHERE = {"LLM": ".llm", "RequestOutput": ".engine.outputs", "SamplingParams": ".sampling"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'parafork' has no attribute {name!r}")
