"""Builds the runner an `EngineConfig` names, loading only what that backend needs."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..engine.runner import Runner

log = logging.getLogger(__name__)


def build_runner(config, path: Path, tokenizer, adapter: Path | None) -> Runner:
    """The runner `config.backend` names, its weights loaded once: "torch" (parafork's own
    paged Llama-family forward), "hf" (any HF causal LM, slow), "llamacpp" (a GGUF file, or
    the model exported to one), or "auto" (llamacpp for a GGUF file, else torch where the
    architecture is supported). A GGUF file on "torch" is de-quantized once into the cache. Reads the model's config.json first to choose."""
    from transformers import AutoConfig

    from .. import models
    from ..export import gguf_for
    from .torch_runner import SUPPORTED_ARCHITECTURES

    if path.suffix == ".gguf" and config.backend == "torch":
        path = models.gguf_as_hf(path)  # its weights de-quantized once; quant="int8" packs them again
    if config.backend == "llamacpp" or path.suffix == ".gguf":
        if config.backend not in ("auto", "llamacpp"):
            raise ValueError(f"{path.name} is a GGUF file: it runs on backend='llamacpp' (as it is) or 'torch' "
                             "(de-quantized once, quant='int8' to pack it again)")
        from .llamacpp_runner import LlamaCppRunner

        return LlamaCppRunner(gguf_for(config, path, adapter), config, len(tokenizer))
    arch = (AutoConfig.from_pretrained(path).architectures or ["?"])[0]
    backend = config.backend
    if backend == "auto":
        backend = "torch" if arch in SUPPORTED_ARCHITECTURES else "hf"
    if backend == "torch" and arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch} is not supported by the torch backend ({', '.join(SUPPORTED_ARCHITECTURES)})")
    if backend == "hf":
        log.warning("%s runs on the slow HF fallback backend (recomputes contexts every step)", arch)
        from .hf_runner import HFRunner

        hf_model = models.load_hf_model(path, tokenizer, config.torch_dtype, adapter=adapter)
        return HFRunner(hf_model, config)
    from .torch_runner import TorchRunner

    # The merged fp32 weights are the source; the runner keeps its own packed copy.
    hf_model = models.load_hf_model(path, tokenizer, torch.float32, adapter=adapter)
    return TorchRunner(hf_model, config)
