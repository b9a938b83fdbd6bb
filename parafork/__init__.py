"""parafork: auto-parallel auto-regressive (APAR) decoding."""
from .engine.llm_engine import LLM, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
