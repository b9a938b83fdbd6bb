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

Int8 weights (`kernels/int8.h`): the row kernel's `mm` takes an int8 blob (`pack_int8`) as well
as packed bf16, computed with AVX-512 VNNI. `load_int8()` gives that module, or on a CPU without
it the same int8 code built for AVX2 + FMA alone (`kernels/int8_avx2.cpp`); `force_avx2` builds
and loads the AVX2 one anywhere (its tests run on AVX-512 machines too; so does
`PARAFORK_INT8_PATH=avx2` for a whole run).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

from .. import models

log = logging.getLogger(__name__)
KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCE = KERNELS / "rowgemm.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp"] + "".split()
AVX2_SOURCE = KERNELS / "int8_avx2.cpp"
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
HEADERS = (KERNELS / "int8.h",)


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
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))} (the row kernel needs AVX-512 BF16 and VNNI)"
    return _no_compiler()


def _no_compiler() -> str | None:
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler (c++/g++) on PATH to build the row kernel"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja) to build the row kernel"
    return None


def build_dir(source: Path = SOURCE, flags: list[str] = FLAGS) -> Path:
    """One build per kernel source (and the headers it includes), torch version and flags, so a change rebuilds it."""
    code = source.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    key = hashlib.blake2b(code + torch.__version__.encode() + " ".join(flags).encode(), digest_size=8)
    return models.cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()}"


def _build(name: str, source: Path, flags: list[str], what: str):
    from torch.utils.cpp_extension import load as build

    where = build_dir(source, flags)
    if not any(where.glob("*.so")):
        log.warning("building %s for this CPU into %s (once, ~30 s)", what, where)
    where.mkdir(parents=True, exist_ok=True)
    try:
        return build(name, [str(source)], extra_cflags=flags, build_directory=str(where), verbose=False), None
    except Exception as e:  # a compiler error: fall back, and say so
        return None, f"{what} did not build ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"


@functools.cache
def _load():
    reason = _why_not()
    if reason:
        return None, reason
    return _build("parafork_rowgemm", SOURCE, FLAGS, "parafork's row kernel")


@functools.cache
def _load_avx2():
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"int8 linears need x86-64 with AVX-512 VNNI or AVX2; this is {platform.machine()}"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return None, f"this CPU has neither AVX-512 VNNI nor AVX2 + FMA (it lacks {', '.join(sorted(missing))}): int8 needs one"
    reason = _no_compiler()
    return (None, reason) if reason else _build("parafork_int8_avx2", AVX2_SOURCE, AVX2_FLAGS, "parafork's AVX2 int8 kernel")


def load_int8(force_avx2: bool = False):
    """A module with `pack_int8` and `mm` (x times a pack_int8 blob) and `int8_path`: the row
    kernel (AVX-512 VNNI) where it loads, else the AVX2 build; raises with the reason where
    neither can be had (int8 was asked for: never a silent fall back to other weights)."""
    force_avx2 = force_avx2 or os.environ.get("PARAFORK_INT8_PATH") == "avx2"  # tests: the AVX2 path on any x86
    if not force_avx2 and load() is not None:
        return load()
    module, reason = _load_avx2()
    if module is None:
        raise RuntimeError(f"int8 weights: {reason}" + ("" if force_avx2 else f" (and the row kernel: {unavailable()})"))
    return module


def load():
    """The compiled kernel module (`pack`, `mm`), or None where it cannot be had."""
    return _load()[0]


def unavailable() -> str | None:
    """Why `load()` gives None; None when the kernel is there."""
    return _load()[1]
