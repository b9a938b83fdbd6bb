"""APAR driven over llama.cpp's own batching server (llama-server in-process through
xllamacpp: parallel slots, continuous batching) with the tuned model exported to GGUF."""
import re

import pytest

from parafork import models
from parafork.bench.driver import llamacpp_server
from parafork.config import EngineConfig
from parafork.export import gguf_for
from parafork.remote import RemoteAPAR


@pytest.fixture(scope="module")
def llamacpp_url(base_dir):
    gguf = gguf_for(EngineConfig(model="bundled", backend="llamacpp"), base_dir, models.BUNDLED_ADAPTER)
    with llamacpp_server(gguf, slots=8, threads=2, n_ctx=8192) as url:
        yield url


def test_apar_through_llamacpps_server_forks_and_restores_the_list(llamacpp_url, base_dir):
    tokenizer, _ = models.load_tokenizer(base_dir)
    driver = RemoteAPAR(llamacpp_url, "gguf", tokenizer)
    prompt = "How can I improve my time management skills?"  # Vicuna 1: the bundled model forks it
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
