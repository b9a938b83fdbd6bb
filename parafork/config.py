"""Engine configuration: one `EngineConfig`, passed whole to the engine and its runner."""
from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

BACKENDS = ("auto", "torch", "hf", "llamacpp")
SPECULATIVE_METHODS = (None, "ngram", "eagle")
STEP_COSTS = ("measured", "fixed")
GGUF_QUANTS = ("f16", "q8_0", "f32")  # what llama.cpp's converter writes (the pinned library exports no quantizer); f32 for exactness tests
# A model's weights on every backend: "int8" on torch (int8 weights computed in int8, runners/kernels/int8.h),
# and on llamacpp the name of its own 8-bit GGUF (q8_0); the GGUF types on llamacpp only.
QUANTS = ("int8",) + GGUF_QUANTS
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
DTYPE_CHOICES = ("auto", "bfloat16", "float32")


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX).

    Elsewhere (e.g. AVX2-only CPUs) bf16 matmuls are emulated: one row costs about what fp32
    costs, and every extra row costs as much again, so parallel threads gain nothing.
    """
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cache_dir() -> Path:
    """Where parafork keeps what it builds or measures once per machine ($PARAFORK_CACHE)."""
    return Path(os.environ.get("PARAFORK_CACHE", "~/.cache/parafork")).expanduser()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What timings depend on besides the configuration: the CPU model and its kernels' level."""
    return f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 where the CPU computes it natively, float32 otherwise."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES) | {'auto'})}, got {name!r}")
    return DTYPES[name]


@dataclass
class EngineConfig:
    model: str = "bundled"  # "bundled" (base + APAR adapter), "base", or a local HF folder (safetensors)
    adapter: str | None = None  # a LoRA adapter folder to merge; "bundled" implies the bundled one
    dtype: str = "auto"  # bf16 where the CPU has native bf16, else float32; float32 for exactness against HF
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int = 2048  # size of the KV pool (2048 x 16 = 32k tokens)
    max_batch_tokens: int = 2048  # tokens fed per forward (prefill is chunked to fit)
    max_model_len: int | None = None  # per thread context; default: the model's positions
    cpu_threads: int | None = None  # torch's CPU threads (not APAR threads); None keeps torch's default
    backend: str = "auto"  # "torch" (parafork's Llama-family runner), "hf" (any model, slow), "llamacpp" (GGUF), "auto"
    # The weights: "int8" (torch: int8 linears; llamacpp: the same as "q8_0"); llamacpp: those of an
    # exported GGUF ("f16", "q8_0", "f32"); None: the dtype's (torch), f16 or a .gguf as it is (llamacpp).
    quant: str | None = None
    prefix_caching: bool = True  # reuse computed KV blocks of identical token prefixes across requests
    speculative: str | None = None  # "ngram", "eagle": requests draft and verify (engine/speculation.py) unless they say "off"
    # A trained EAGLE-3 head (draft/head.py) for "eagle" drafts: a folder, or "bundled" (the one
    # shipped for the bundled adapter); None: "bundled" where speculative is "eagle", else none.
    draft_head: str | None = None
    admission_reserve: float = 1.0  # scales the future KV a request must find free to be admitted (scheduler.py); 0: none
    # A fork sampled in a step of at least this many rows is deferred (engine.py): the child gets
    # the parent's KV one step later, [Fork] included, and feeds one row fewer. None: never; 0: every
    # fork. A fixed rule on purpose: under a shared max_tokens the threads' pace decides which get
    # the last tokens, so a threshold read from timings would make the text depend on them.
    defer_forks_from_rows: int | None = 0
    # "measured": time decode steps of 1-64 rows at start-up (once per machine, cached) where the
    # runner allows it, "fixed": the runner's constant per-row cost (engine/step_cost.py).
    step_cost: str = "measured"
    row_kernel: bool = True  # torch, bf16: linears through parafork's AVX-512 BF16 row kernel where it builds (row_kernel.py)

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)  # validates
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.quant is not None and self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.quant == "int8" and self.backend == "llamacpp":
            self.quant = "q8_0"  # llama.cpp's own int8 weights (blocks of 32, one scale each)
        if self.quant == "int8" and self.backend == "hf":
            raise ValueError("quant='int8' runs on backend='torch' (or 'llamacpp', as q8_0), not on 'hf'")
        if self.quant in GGUF_QUANTS and self.backend != "llamacpp":
            raise ValueError(f"quant={self.quant!r} is a GGUF type: backend='llamacpp' only (torch takes quant='int8')")
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be None or one of {', '.join(SPECULATIVE_METHODS[1:])}, got {self.speculative!r}")
        if not isinstance(self.admission_reserve, (int, float)) or not 0 <= self.admission_reserve <= 4:
            raise ValueError(f"admission_reserve must be a number from 0 to 4, got {self.admission_reserve!r}")
        if self.defer_forks_from_rows is not None and (isinstance(self.defer_forks_from_rows, bool) or
                not isinstance(self.defer_forks_from_rows, int) or self.defer_forks_from_rows < 0):
            raise ValueError(f"defer_forks_from_rows must be None or an integer >= 0, got {self.defer_forks_from_rows!r}")
        if self.step_cost not in STEP_COSTS:
            raise ValueError(f"step_cost must be one of {', '.join(STEP_COSTS)}, got {self.step_cost!r}")
        for name in ("block_size", "num_kv_blocks", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)


def add_engine_args(p: argparse.ArgumentParser, speculative: bool = True, vllm: bool = False) -> None:
    """The engine options of every command (`EngineConfig`'s fields, where they are defined);
    `speculative`: offer --speculative (benches choose their modes' drafting themselves);
    `vllm`: offer --backend vllm (APAR on real vLLM, `vllm/server.py`; not an engine runner)."""
    p.add_argument("--model", default="bundled", help="'bundled', 'base', a local HF folder (safetensors) or a .gguf file")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 where the CPU computes it natively, float32 otherwise")
    p.add_argument("--cpu-threads", type=int, default=2, help="torch CPU threads (not APAR threads)")
    p.add_argument("--backend", default="auto", choices=BACKENDS + (("vllm",) if vllm else ()),
                   help="model runner: torch (parafork's own, Llama family), hf (any model, slow), "
                        "llamacpp (GGUF through llama.cpp), auto (llamacpp for a .gguf, else torch)"
                        + ("; vllm: APAR on real vLLM (`vllm serve` from .venv-vllm) against vLLM's own AR" if vllm else ""))
    p.add_argument("--quant", default=None, choices=QUANTS,
                   help="the weights: int8 (torch: int8 linears computed in int8, half bf16's bytes; llamacpp: q8_0); "
                        "llamacpp: those of the GGUF exported from --model (default f16; 'base': the shipped Q4_1)")
    if speculative:
        p.add_argument("--speculative", default=None, choices=[m for m in SPECULATIVE_METHODS if m],
                       help="requests draft tokens and verify them in every thread, unless they say 'off': 'ngram' by "
                            "lookup in what the thread sees, 'eagle' from a trained draft head (--draft-head; the "
                            "bundled model ships one; torch backend)")
        p.add_argument("--draft-head", default=None,
                       help="a trained EAGLE-3 head's folder (parafork train-draft) or 'bundled' (default with "
                            "--speculative eagle): requests may then ask for 'eagle' drafts")


def engine_options(args) -> dict:
    """The `EngineConfig` fields every command takes from `add_engine_args` (the model apart)."""
    return dict(dtype=args.dtype, cpu_threads=args.cpu_threads, backend=args.backend, quant=args.quant,
                speculative=getattr(args, "speculative", None), draft_head=getattr(args, "draft_head", None))
