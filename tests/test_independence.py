"""The independence check: scores line up with tokens, and dependent branches merge back."""
import torch

from parafork import models
from parafork.data.extract import Node
from parafork.data.independence import BranchScore, merge_dependent, score_tree

TREE = Node(["Intro:\n\n1. First head:", Node([" body one.\n   - Sub head here:", Node([" sub body."]), ""]),
             "\n2. Second head:", Node([" body two goes here."]), "\n\nEnd."])


def test_scores_match_a_direct_computation_for_a_plain_branch(tiny_dir, tiny_llm):
    tok, ct = tiny_llm.tokenizer, tiny_llm.control
    model = models.load_hf_model(tiny_dir, tok)
    prompt = models.apply_chat_template(tok, "q")
    scores = score_tree(model, tok, ct, prompt, TREE)
    assert len(scores) == 3
    # Branch 3 ("body two") alone: the root's own text up to its head (no sibling bodies), then the body.
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    root_prefix = prompt + enc("Intro:\n\n1. First head:") + enc("\n2. Second head:")
    body = enc(" body two goes here.")
    seq = torch.tensor(root_prefix + body)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(seq[None]).logits[0][:-1], seq[1:], reduction="none")
    expected = nll[len(root_prefix) :].mean()  # the body without its first token
    assert abs(scores[2].alone - float(expected)) < 1e-4
    # Serial: the whole answer before it.
    serial = prompt + enc("Intro:\n\n1. First head:") + enc(" body one.\n   - Sub head here:") + enc(" sub body.")
    serial += enc("") + enc("\n2. Second head:") + body
    seq = torch.tensor(serial)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(seq[None]).logits[0][:-1], seq[1:], reduction="none")
    assert abs(scores[2].serial - float(nll[-(len(body) - 1):].mean())) < 1e-4


def test_dependent_branches_merge_back_and_text_is_unchanged():
    scores = [BranchScore(3.0, 2.0), BranchScore(1.0, 1.0), BranchScore(1.0, 1.1)]
    merged = merge_dependent(TREE, scores, threshold=0.5)
    assert merged.text() == TREE.text()
    assert len(merged.children) == 1 and merged.children[0].text() == " body two goes here."
    assert merge_dependent(TREE, [BranchScore(0, 0)] * 3).to_json() == TREE.to_json()
