"""parafork's row kernel: a linear layer over a few rows at the cost of reading its weights once.

APAR pays only if a decode step of a few rows costs about one row. oneDNN's bf16 GEMV does
not get there on these CPUs: the SmolLM2-135M linear stack (30 layers + lm_head, weights far
larger than the caches) took 12.9 ms for one row (21 GB/s) on the 2-core Zen 5; this kernel
(`kernels/rowgemm.cpp`, AVX-512 BF16 `vdpbf16ps` over weights packed 16 outputs x 2 k per
64-byte line) took 8.1 ms (33 GB/s, close to what a plain read reaches), 8 rows 1.14-1.29x
one row (since: 6.9 ms, 8 rows 1.16x, 16 rows 1.22x; results/rows/). Past 16 rows (prefill
chunks, wide batches) it goes 16 rows at a time over each L2-resident group of weights.

It is compiled for the machine it runs on, once, with torch's C++ extension builder (gcc,
ninja; ~30 s on 2 cores) into `$PARAFORK_CACHE/kernels/`, and loaded from there afterwards.
Where it cannot be had (no AVX-512 BF16, no compiler, a failed build) `load()` returns None
and `unavailable()` says why; the torch runner then uses oneDNN, as it did before.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import platform
import shutil
from pathlib import Path

import torch

from .. import models

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "kernels" / "rowgemm.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _why_not() -> str | None:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the row kernel is for x86-64 with AVX-512 BF16; this is {platform.machine()}"
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))} (the row kernel needs AVX-512 BF16)"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler (c++/g++) on PATH to build the row kernel"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja) to build the row kernel"
    return None


def build_dir() -> Path:
    """One build per kernel source, torch version and flags, so a change rebuilds it."""
    key = hashlib.blake2b(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode(), digest_size=8)
    return models.cache_dir() / "kernels" / f"rowgemm-{key.hexdigest()}"


@functools.cache
def _load():
    reason = _why_not()
    if reason:
        return None, reason
    from torch.utils.cpp_extension import load as build

    where = build_dir()
    fresh = not any(where.glob("*.so"))
    if fresh:
        log.warning("building parafork's row kernel for this CPU into %s (once, ~30 s)", where)
    where.mkdir(parents=True, exist_ok=True)
    try:
        module = build("parafork_rowgemm", [str(SOURCE)], extra_cflags=FLAGS, build_directory=str(where), verbose=False)
    except Exception as e:  # a compiler error: fall back, and say so
        return None, f"the row kernel did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
    return module, None


def load():
    """The compiled kernel module (`pack`, `mm`), or None where it cannot be had."""
    return _load()[0]


def unavailable() -> str | None:
    """Why `load()` gives None; None when the kernel is there."""
    return _load()[1]
