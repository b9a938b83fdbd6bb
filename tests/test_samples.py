"""Packed tree samples: the mask, the positions, and loss equal to separate causal samples."""
import pytest
import torch
import torch.nn.functional as F

from parafork import models
from parafork.data.extract import Node
from parafork.data.samples import IGNORE, full_context, pack, tree_threads

TREE = Node(["Tips:\n\n1. First thing:", Node([" do it early.\n   - Sub point one:", Node([" small."]), ""]),
             "\n2. Second thing:", Node([" do it well."]), "\n\nDone."])


@pytest.fixture(scope="module")
def packed(tiny_llm):
    prompt = models.apply_chat_template(tiny_llm.tokenizer, "Give me tips.")
    threads = tree_threads(prompt, TREE, tiny_llm.tokenizer, tiny_llm.control)
    return threads, pack(threads)


def test_threads_are_the_apar_linear_form(packed, tiny_llm):
    threads, _ = packed
    ct = tiny_llm.control
    assert len(threads) == 4
    assert threads[0].tokens.count(ct.fork_id) == 2 and threads[1].tokens.count(ct.fork_id) == 1
    for child in threads[1:]:
        assert child.tokens[0] == ct.child_id and child.tokens[-1] in ct.eos_ids
        assert child.start_pos == child.fork_pos + 1
        assert full_context(threads, child.parent)[child.fork_pos] == ct.fork_id


def test_mask_sees_ancestors_up_to_the_fork_and_never_siblings(packed):
    threads, p = packed
    owner = torch.cat([torch.full((len(t.tokens),), i) for i, t in enumerate(threads)])
    first, second, grandchild = 1, 3, 2
    q = (owner == second).nonzero()[0, 0]
    assert not p.allowed[q, owner == first].any(), "siblings never see each other"
    assert not p.allowed[q, owner == grandchild].any()
    sees_root = p.allowed[q, owner == 0]
    assert sees_root.sum() == threads[second].fork_pos + 1, "root up to and including the fork"
    g = (owner == grandchild).nonzero()[-1, 0]
    assert p.allowed[g, owner == first].sum() == threads[grandchild].fork_pos - threads[first].start_pos + 1
    assert p.allowed[g, owner == 0].sum() == threads[first].fork_pos + 1
    assert p.allowed.diagonal().all()


def test_packed_loss_equals_separate_causal_samples(packed, tiny_dir, tiny_llm):
    threads, p = packed
    hf = models.load_hf_model(tiny_dir, tiny_llm.tokenizer, torch.float32)
    with torch.no_grad():
        logits = hf(
            input_ids=p.input_ids[None], position_ids=p.position_ids[None], attention_mask=p.attention_bias(torch.float32)
        ).logits[0]
    packed_loss = F.cross_entropy(logits, p.labels, ignore_index=IGNORE, reduction="none")
    offset = 0
    for t, thread in enumerate(threads):
        seq = full_context(threads, t)
        with torch.no_grad():
            ref_logits = hf(torch.tensor([seq])).logits[0]
        n = len(thread.tokens)
        own = slice(thread.start_pos, thread.start_pos + n - 1)  # predictions of the thread's next tokens
        ref = F.cross_entropy(ref_logits[own], torch.tensor(seq[own.start + 1 : own.stop + 1]), reduction="none")
        got = packed_loss[offset : offset + n - 1]
        lo = thread.first_label
        assert torch.allclose(got[lo:], ref[lo:], atol=1e-4), f"thread {t}"
        assert (p.labels[offset : offset + lo] == IGNORE).all()
        offset += n
