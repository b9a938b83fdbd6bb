"""The independence check: scores line up with tokens, and dependent branches merge back."""
import torch

from parafork import models
from parafork.data.extract import JOIN, Node
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


def test_a_join_left_with_nothing_to_join_goes_with_its_merged_branches():
    tree = Node(["A:\n1. One:", Node([" first."]), "\n2. Two:", Node([" second."]), JOIN, "\n\nB:\n- Three:",
                 Node([" third."]), "\n- Four:", Node([" fourth."]), JOIN, "\n\nEnd."])
    kept = merge_dependent(tree, [BranchScore(0, 0)] * 4, threshold=0.5)
    assert kept.segments.count(JOIN) == 2
    first_merged = merge_dependent(tree, [BranchScore(3, 1), BranchScore(3, 1), BranchScore(0, 0), BranchScore(0, 0)], 0.5)
    assert first_merged.text() == tree.text() and first_merged.segments.count(JOIN) == 1
    assert first_merged.segments[0] == "A:\n1. One: first.\n2. Two: second.\n\nB:\n- Three:"
    one_left = merge_dependent(tree, [BranchScore(3, 1), BranchScore(0, 0), BranchScore(3, 1), BranchScore(3, 1)], 0.5)
    assert one_left.segments.count(JOIN) == 1 and one_left.segments.index(JOIN) == 2  # after " second."


def test_fast_scores_equal_slow_oracle_on_nested_trees(tiny_dir, tiny_llm):
    tok, ct = tiny_llm.tokenizer, tiny_llm.control
    model = models.load_hf_model(tiny_dir, tok)
    trees = [TREE, Node(["A:", Node([" one one one."]), " B:", Node([" two two."]), " C:", Node([" three."]), "!"])]
    for chat, tree in zip(["q", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                 {"role": "user", "content": "list"}]], trees):
        prompt = models.apply_chat_template(tok, chat)
        fast = score_tree(model, tok, ct, prompt, tree)
        assert len(fast) == len(tree.children) + sum(len(c.children) for c in tree.children)
        for k, (got, expect) in enumerate(zip(fast, _slow(model, tok, prompt, tree))):
            assert abs(got.alone - expect[0]) < 1e-4 and abs(got.serial - expect[1]) < 1e-4, k


def _slow(model, tok, prompt, root):
    """Independent, slow oracle: per branch, the mean NLL of its own tokens (its children's
    text excluded, its first token left out) in one causal forward over what it sees alone
    (its ancestors' text up to its head, then its own text so far) and in one causal forward
    over the whole answer in reading order."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    def nll(ids):
        seq = torch.tensor(ids)
        with torch.no_grad():
            out = torch.nn.functional.cross_entropy(model(seq[None]).logits[0][:-1], seq[1:], reduction="none")
        return [0.0] + out.tolist()  # out[i]: the NLL of token i

    serial = list(prompt)
    branches = []  # (ancestors' tokens up to the head, own tokens as (token, serial index, own index))

    def walk(node, context):
        own = []  # (serial index, index in the alone sequence)
        me = len(branches)
        branches.append(None)
        alone = list(context)
        for s in node.segments:
            if isinstance(s, str):
                for t in enc(s):
                    own.append((len(serial), len(alone)))
                    serial.append(t)
                    alone.append(t)
            else:
                walk(s, alone)
        branches[me] = (alone, own)

    for s in root.segments:
        if isinstance(s, str):
            serial.extend(enc(s))
        else:
            walk(s, list(serial_root_context(root, s, prompt, enc)))
    full = nll(serial)
    out = []
    for alone, own in branches:
        a = nll(alone)
        own = own[1:]
        out.append((sum(a[j] for _, j in own) / len(own), sum(full[i] for i, _ in own) / len(own)))
    return out


def serial_root_context(root, child, prompt, enc):
    """The prompt and the root's own text before `child` (no earlier branches' text)."""
    ids = list(prompt)
    for s in root.segments:
        if s is child:
            return ids
        if isinstance(s, str):
            ids += enc(s)
    raise ValueError("not a child of root")


def test_the_folder_check_resumes_and_writes_the_checked_set(tiny_dir, tmp_path, monkeypatch):
    import json

    from parafork.data import build as data_build

    answers = [TREE.text(), "Ideas:\n\n1. **Walk:** go out daily.\n2. **Read:** a page a night.\n3. **Cook:** at home more."]
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i, a in enumerate(answers):
        root = data_build.extract(a).root if i else TREE
        rows.append({"key": f"c{i}:0", "turn": 0, "context": [], "prompt": f"q{i}", "answer": a, "kind": "x", "tree": root.to_json()})
    data_build.write_jsonl(folder / "trees.jsonl", rows)
    calls = []
    import parafork.data.independence as ind

    real = ind.score_tree

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(ind, "score_tree", counting)
    first = data_build.check_folder(folder, str(tiny_dir), threshold=1e9, limit=1)
    assert first["scored_trees"] == 1 and len(calls) == 1
    second = data_build.check_folder(folder, str(tiny_dir), threshold=1e9)
    assert len(calls) == 2  # the first tree was not scored again
    assert second["scored_trees"] == 2 and second["before"] == second["after"]  # nothing is dependent at 1e9 nats
    lines = [json.loads(l) for l in open(folder / "scores.jsonl")]
    assert [r["key"] for r in lines] == ["c0:0", "c1:0"] and len(lines[0]["alone"]) == 3
    # Every branch dependent: the trees' branches merge back and they move to the plain answers.
    strict = data_build.check_folder(folder, str(tiny_dir), threshold=-1e9)
    assert len(calls) == 2 and strict["after"] == {"trees": 0, "branches": 0} and strict["demoted_to_plain"] == 2
    demoted = data_build.read_jsonl(folder / "demoted.jsonl")
    assert [r["answer"] for r in demoted] == answers and "tree" not in demoted[0]
