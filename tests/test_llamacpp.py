"""APAR through llama.cpp's server (llama-cpp-python[server]) with the tuned model as GGUF.

Needs what CI does not build (about 12 minutes): `make test-llamacpp` installs
llama-cpp-python, exports the bundled model, converts it to GGUF with llama.cpp's
converter and runs this file with PARAFORK_LLAMACPP_GGUF set. Without them it is skipped,
and pytest prints why.
"""
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from parafork import models
from parafork.remote import RemoteAPAR

from .test_server import free_port

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed (make test-llamacpp)")
GGUF = os.environ.get("PARAFORK_LLAMACPP_GGUF")
if not GGUF or not os.path.isfile(GGUF):
    pytest.skip("PARAFORK_LLAMACPP_GGUF names no GGUF of the tuned model (make test-llamacpp)", allow_module_level=True)


@pytest.fixture(scope="module")
def llamacpp_url():
    port = free_port()
    log = open(os.path.join(os.path.dirname(GGUF), "llama-server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", GGUF, "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "4096", "--n_threads", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"llama.cpp server did not start; see {log.name}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_apar_through_the_llamacpp_server_forks_and_restores_the_list(llamacpp_url, base_dir):
    tokenizer, _ = models.load_tokenizer(base_dir)
    driver = RemoteAPAR(llamacpp_url, "gguf", tokenizer)
    prompt = "What are the most effective ways to deal with stress?"
    apar = driver.generate(prompt, max_tokens=300)
    assert apar.threads >= 3 and apar.completion_tokens <= 300
    assert "[Fork]" not in apar.text and "[Child]" not in apar.text
    numbers = [int(n) for n in re.findall(r"^(\d+)\.", apar.text, flags=re.M)]
    assert numbers[:3] == [1, 2, 3]  # heads in reading order, each followed by its own body
    # Each numbered item has a body: its child's text sits between its head and the next head.
    items = re.split(r"^\d+\.", apar.text, flags=re.M)[1:4]
    assert all(len(item.split()) > 5 for item in items)
    ar = driver.generate_ar(prompt, max_tokens=300)
    assert ar.threads == 1 and "[Fork]" not in ar.text and ar.text


def test_bench_engine_measures_the_llamacpp_reference_line(base_dir):
    from parafork.bench.engine import llamacpp_tokens_per_s

    tokenizer, _ = models.load_tokenizer(base_dir)
    prompt_ids = models.apply_chat_template(tokenizer, "Give me three tips for sleeping well.")
    assert llamacpp_tokens_per_s(GGUF, prompt_ids, tokens=16, threads=2) > 0
