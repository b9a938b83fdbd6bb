import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from parafork import models
from parafork.llm import LLM

torch.set_num_threads(2)

# Real prompts of the kind APAR is for (lists and paragraphs) and a few that are not.
PROMPTS = [
    "Give me three tips for sleeping well.",
    "What are the main benefits of regular exercise?",
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
    "List some ways to save money on groceries.",
]


@pytest.fixture(scope="session")
def base_dir():
    return models.ensure_base_model()


@pytest.fixture(scope="session")
def tiny_dir(base_dir, tmp_path_factory):
    """A tiny random Llama with the real tokenizer, saved as a safetensors HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = models.load_tokenizer(base_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer) - 1,  # drawn as before [Join] existed (the tests' answers stay), then grown
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[-1] = emb[:-1].mean(dim=0)  # [Join]: the mean row, as models.load_hf_model grows a vocabulary
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir):
    return LLM(str(tiny_dir), dtype="float32", num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="session")
def base_llm(base_dir):
    return LLM("base", dtype="float32", num_kv_blocks=512, block_size=16)


@pytest.fixture(scope="session")
def base_hf(base_llm, base_dir):
    return models.load_hf_model(base_dir, base_llm.tokenizer, torch.float32)


@pytest.fixture(scope="session")
def head_dir(tiny_dir, tmp_path_factory):
    """A random head shaped for the tiny model, reading both its layers; its vocabulary the
    ids 0..1999 and the control tokens (whatever the tiny model writes falls mostly outside,
    so drafts are rejected as often as they come: what is tested is that nothing changes)."""
    from transformers import LlamaConfig

    from parafork.draft.head import EagleHead, HeadConfig

    target = LlamaConfig.from_pretrained(tiny_dir)
    llm = LLM(str(tiny_dir), dtype="float32", num_kv_blocks=16, step_cost="fixed")
    vocab = sorted(set(range(2000)) | {llm.control.fork_id, llm.control.child_id, llm.control.join_id,
                                       *llm.control.eos_ids})
    torch.manual_seed(0)
    head = EagleHead(HeadConfig.for_target(target, vocab_size=llm.engine.runner.info.vocab_size,
                                           draft_vocab_size=len(vocab), aux_layers=(0, 1)))
    head.set_vocabulary(vocab)
    folder = tmp_path_factory.mktemp("head")
    head.save(folder)
    return folder
