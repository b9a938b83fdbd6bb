"""parafork: auto-parallel auto-regressive (APAR) decoding."""
from .engine.engine import RequestOutput
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
