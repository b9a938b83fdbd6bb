"""The EAGLE-3 head (draft/head.py) against a naive oracle, its files in vLLM's layout, and a
tiny self-distilled training run (draft/train.py) that learns, resumes and reports."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from parafork.draft import data
from parafork.draft.head import EagleHead, HeadConfig
from parafork.draft.train import DraftTrainConfig, train_head

CONFIG = HeadConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24,
                    rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=50, draft_vocab_size=12, aux_layers=(0, 1, 2),
                    max_position_embeddings=64)


def _naive(head: EagleHead, aux, embeds, steps):
    """Position by position, step by step, with explicit key lists: step j at t attends to the
    step-0 keys of positions <= t and to its own chain's keys of steps 1..j at t."""
    c, m = head.config, head.midlayer
    T = aux.shape[0]
    group = c.num_attention_heads // c.num_key_value_heads
    from parafork.draft.head import rotate

    def qkv(feature, emb, pos):
        x = torch.cat([m.input_layernorm(emb), m.hidden_norm(feature)], -1)[None]
        q, k, v = m.self_attn.qkv(x, torch.tensor([pos]))
        return x, q[0], k[0], v[0]

    outs = torch.zeros(steps, T, c.hidden_size)
    feature0 = head.fc(aux)
    ctx = [qkv(feature0[t], embeds[t], t)[2:] for t in range(T)]  # step-0 keys and values
    for t in range(T):
        feature, chain = feature0[t], []
        for j in range(steps):
            _, q, k, v = qkv(feature, embeds[t + j], t + j)
            keys = [ctx[s] for s in range(t + 1)] if j == 0 else [ctx[s] for s in range(t + 1)] + chain + [(k, v)]
            if j > 0:
                chain.append((k, v))
            else:
                chain = []
            att = []
            for hq in range(c.num_attention_heads):
                kv = hq // group
                scores = torch.stack([(q[hq] * kk[kv]).sum() / math.sqrt(c.head_dim) for kk, _ in keys])
                p = torch.softmax(scores, 0)
                att.append(sum(pi * vv[kv] for pi, (_, vv) in zip(p, keys)))
            h = feature + m.self_attn.o_proj(torch.cat(att))
            h = h + m.mlp(m.post_attention_layernorm(h))
            outs[j, t] = head.norm(h)
            feature = h
    return outs


def test_unroll_equals_a_position_by_position_oracle():
    torch.manual_seed(0)
    head = EagleHead(CONFIG)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    T, steps = 7, 3
    aux = torch.randn(1, T, 3 * CONFIG.hidden_size)
    embeds = torch.randn(1, T + steps - 1, CONFIG.hidden_size)
    with torch.no_grad():
        fast = torch.stack(head.unroll(aux, embeds, steps))[:, 0]
        slow = _naive(head, aux[0], embeds[0], steps)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_files_follow_vllms_eagle3_layout_and_round_trip(tmp_path):
    head = EagleHead(CONFIG)
    head.set_vocabulary([3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41])
    head.save(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.hidden_norm.weight",
            "midlayer.input_layernorm.weight", "midlayer.mlp.gate_proj.weight", "norm.weight", "lm_head.weight",
            "d2t", "t2d"} <= names
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 12
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    again = EagleHead.load(tmp_path)
    assert again.draft_to_target.tolist() == [3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41]
    assert int(again.t2d.sum()) == 12 and bool(again.t2d[41]) and not bool(again.t2d[4])
    with pytest.raises(ValueError, match="draft vocabulary"):
        head.set_vocabulary([1, 2, 3])
    with pytest.raises(FileNotFoundError, match="no draft head"):
        EagleHead.load(tmp_path / "missing")


def test_a_tiny_head_learns_resumes_and_writes_its_card(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LLM_OPTIONS", {"dtype": "float32", "block_size": 4, "step_cost": "fixed"})
    prompts = [{"key": f"p{k}", "context": [], "prompt": f"List {k + 2} fruits and say why."} for k in range(6)]
    data.harvest(data.HarvestConfig(out=str(tmp_path / "data"), requests=6, model=str(tiny_dir), max_tokens=40,
                                    concurrency=3, num_kv_blocks=256, cpu_threads=1), (0, 1), prompts)
    cfg = DraftTrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "head"), model=str(tiny_dir),
                           draft_vocab=300, ttt_steps=2, epochs=3, lr=3e-3, batch_tokens=256, held_out=0.0, save_every=2,
                           cpu_threads=1)
    card = train_head(cfg)
    steps = card["train"]["optimizer_steps"]
    assert steps >= 6 and card["train"]["resumed_at_step"] == 0 and card["draft_vocab_asked"] == 300
    assert 4 < card["draft_vocab"] <= 300 and card["held_out_label_coverage"] == 0  # nothing held out
    assert sum(card["train"]["loss_last"]) < sum(card["train"]["loss_first"])  # it learns
    head = EagleHead.load(tmp_path / "head" / "head")
    assert head.config.aux_layers == (0, 1) and head.config.card == card
    assert json.loads((tmp_path / "head" / "card.json").read_text()) == card
    # Run again: the checkpoint is complete, nothing is trained twice.
    assert train_head(cfg)["train"]["resumed_at_step"] == steps
    # Settings that differ from the checkpoint's are refused, not mixed in.
    with pytest.raises(ValueError, match="other data or settings"):
        train_head(DraftTrainConfig(**{**cfg.__dict__, "lr": 1e-2}))
    # A warm start on more answers keeps its start's vocabulary (more data may rank tokens otherwise).
    more = [{"key": f"q{k}", "context": [], "prompt": f"Name {k + 2} rivers of {k + 2} continents."} for k in range(3)]
    data.harvest(data.HarvestConfig(out=str(tmp_path / "data"), requests=9, model=str(tiny_dir), max_tokens=40,
                                    concurrency=3, num_kv_blocks=256, cpu_threads=1), (0, 1), prompts + more)
    warm = DraftTrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "warm"), "epochs": 1,
                               "init_head": str(tmp_path / "head" / "head")})
    assert train_head(warm)["data"]["requests"] == 9
    assert EagleHead.load(tmp_path / "warm" / "head").draft_to_target.tolist() == head.draft_to_target.tolist()
    with pytest.raises(ValueError, match="draft_vocab=300"):
        train_head(DraftTrainConfig(**{**warm.__dict__, "out": str(tmp_path / "warm2"), "draft_vocab": 200}))


def _random_head(seed: int) -> tuple[EagleHead, torch.Tensor]:
    """A head of CONFIG with weights large enough for confident, varied drafts, and an embedding table."""
    torch.manual_seed(seed)
    head = EagleHead(CONFIG)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    head.set_vocabulary(list(range(CONFIG.draft_vocab_size)))
    return head, torch.randn(CONFIG.vocab_size, CONFIG.hidden_size)


def test_the_engines_drafter_chains_what_training_unrolls():
    """engine/eagle.py decodes a chain position by position with a growing cache; `unroll` trains
    all positions at once. Fed the drafted tokens as the next tokens, the unrolled steps at the
    last position predict exactly the chain the drafter wrote."""
    from parafork.engine.eagle import HeadDrafter

    head, embed = _random_head(1)
    drafter = HeadDrafter(head, lambda ids: embed[ids], fork_id=-1, stop_ids=set(), child_id=-2)
    T = 9
    tokens = torch.randint(0, CONFIG.draft_vocab_size, (T + 1,)).tolist()  # positions 0..T, the last pending
    aux = torch.randn(T, 3 * CONFIG.hidden_size)
    drafter.observe(7, 0, tokens[:5], aux[:5])  # fed in two steps, as the engine would
    drafter.observe(7, 5, tokens[5:T], aux[5:T])
    [(draft, confidence, dists, _)] = drafter.propose([(7, tokens[:T + 1], 3)])
    assert dists == []  # greedy: a point mass, no distribution
    assert len(draft) == 3 and confidence == sorted(confidence, reverse=True) and 0 < confidence[-1] <= 1
    # Unrolled over positions 0..T-1: position T-1 sees tokens[T] (pending), then the drafts.
    inputs = torch.tensor(tokens[1:T + 1] + draft[:2])
    with torch.no_grad():
        outs = head.unroll(aux[None], embed[inputs][None], 3)
    assert [int(head.logits(o[0, T - 1]).argmax()) for o in outs] == draft


def test_held_out_figures_count_labels_outside_the_draft_vocabulary_and_read_what_sampling_keeps():
    """`evaluate` against a position-by-position oracle: its denominator is every labelled
    position (a label outside the draft vocabulary is a miss, not skipped), and at a temperature
    it reads how often a first draft token would be kept: sum(min(p, q)) for a token drawn from
    the head, p(argmax q) for its most likely one."""
    from parafork.draft.train import Sequence, evaluate

    head, embed = _random_head(4)
    head.set_vocabulary([0, 2, 3, 5, 7, 8, 11, 13, 17, 19, 23, 29])
    h = CONFIG.hidden_size
    tokens = torch.tensor([1, 5, 7, 9, 5, 5, 2, 7, 13, 4, 3, 7, 7, 29])  # 9, 4: outside the draft vocabulary
    shard = {"tokens": tokens.int(), "aux": torch.randn(14, 3 * h).bfloat16(), "final": torch.randn(14, h).bfloat16()}
    seq = Sequence(0, torch.arange(14), first_label=4, held_out=True, answer_start=4)
    t2d = torch.full((CONFIG.vocab_size,), -100)
    t2d[head.draft_to_target] = torch.arange(12)
    cfg = DraftTrainConfig(data="unused", out="unused", ttt_steps=1)
    out = evaluate(head, [shard], [seq], embed, t2d, cfg, temperature=0.7)
    head.eval()
    with torch.no_grad():
        [normed] = head.unroll(shard["aux"].float()[None, :13], embed[tokens[1:14]][None], 1)
        logits = head.logits(normed[0])  # position t predicts the token at t + 2
    hits = kept = most = 0.0
    labelled = range(2, 12)  # labels from the answer's start (token 4) to the last token: t + 2 in 4..13
    for t in labelled:
        hits += int(head.draft_to_target[logits[t].argmax()]) == int(tokens[t + 2])
        q = torch.softmax(logits[t] / 0.7, -1)
        p = torch.softmax(shard["final"][t + 1].float() @ embed.T / 0.7, -1)[head.draft_to_target]
        kept += float(torch.minimum(p, q).sum())
        most += float(p[q.argmax()])
    assert out["positions"] == len(labelled)
    assert out["chain_accepted_share"][0] == pytest.approx(hits / len(labelled), abs=1e-4)
    assert out["first_token_kept"]["kept_drawn"] == pytest.approx(kept / len(labelled), abs=1e-3)
    assert out["first_token_kept"]["kept_most_likely"] == pytest.approx(most / len(labelled), abs=1e-3)


def test_a_sampled_request_gets_tokens_drawn_from_the_heads_distribution():
    """With (temperature, generator) the drafter draws each token from the head's distribution at
    that temperature and returns it (for the engine's speculative-sampling rule): the first token
    over many draws follows its distribution, `[Child]` is never drawn, and the confidence is the
    distribution's top probability whatever was drawn (so where a chain is cut does not depend on
    the token offered)."""
    from parafork.engine.eagle import HeadDrafter

    head, embed = _random_head(3)
    child = 5
    drafter = HeadDrafter(head, lambda ids: embed[ids], fork_id=-1, stop_ids=set(), child_id=child)
    T = 9
    tokens = torch.randint(0, CONFIG.draft_vocab_size, (T + 1,), generator=torch.Generator().manual_seed(3)).tolist()
    drafter.observe(7, 0, tokens[:T], torch.randn(T, 3 * CONFIG.hidden_size))
    [(greedy, greedy_conf, _, _)] = drafter.propose([(7, tokens, 1)])
    n, counts, firsts = 3000, Counter(), set()
    for seed in range(n):
        [(draft, conf, dists, _)] = drafter.propose([(7, tokens, 2)], sampling=[(2.0, torch.Generator().manual_seed(seed))])
        assert len(dists) == len(draft) == 2 and all(abs(float(q.sum()) - 1) < 1e-5 for q in dists)
        counts[draft[0]] += 1
        firsts.add(round(conf[0], 6))
        q = dists[0]
    assert len(firsts) == 1 and firsts.pop() == pytest.approx(float(q.max()), abs=1e-6)
    assert float(q[child]) == 0 and child not in counts
    assert q.max() < 0.9 and len(counts) > 3  # (temperature 2: a spread to draw from, not the greedy token alone)
    for token, k in counts.items():
        share = float(q[token])
        assert abs(k - n * share) < 4.5 * (n * share * (1 - share)) ** 0.5 + 1, (token, k, n * share)


def test_siblings_are_the_heads_next_most_likely_tokens_at_each_chain_position():
    """`siblings=2` (greedy asks): at every chain position the head's second and third most
    likely tokens, each with the chain's confidence before that position times its probability
    (at position 0 read against the distribution a sampled ask gets at temperature 1); the chain
    is unchanged; `[Child]`, fork and end tokens are never siblings; `sibling_gain` cuts them."""
    from parafork.engine.eagle import HeadDrafter

    head, embed = _random_head(3)
    T = 9
    tokens = torch.randint(0, CONFIG.draft_vocab_size, (T + 1,), generator=torch.Generator().manual_seed(4)).tolist()

    def drafter(**ids):
        d = HeadDrafter(head, lambda x: embed[x], **{"fork_id": -1, "stop_ids": set(), "child_id": -2, **ids})
        d.observe(7, 0, tokens[:T], torch.randn(T, 3 * CONFIG.hidden_size, generator=torch.Generator().manual_seed(5)))
        return d

    [(chain, conf, _, siblings)] = drafter().propose([(7, tokens, 3)], siblings=[2])
    [(plain, plain_conf, _, none)] = drafter().propose([(7, tokens, 3)])
    assert chain == plain and conf == plain_conf and none == [] and len(chain) == 3
    [(_, _, [q], _)] = drafter().propose([(7, tokens, 1)], sampling=[(1.0, torch.Generator().manual_seed(0))])
    order = q.argsort(descending=True).tolist()  # (this head's draft vocabulary maps to itself)
    assert order[0] == chain[0]
    first = [(j, t, g) for j, t, g in siblings if j == 0]
    assert [t for _, t, _ in first] == order[1:3]
    assert [g for *_, g in first] == pytest.approx([float(q[t]) for t in order[1:3]], abs=1e-5)
    for j in (1, 2):  # below the chain's confidence before j, and below its own token's
        at = [(t, g) for d, t, g in siblings if d == j]
        assert len(at) == 2 and all(g < conf[j] and t != chain[j] for t, g in at)
    # Control and end tokens are left out (fewer siblings, not others); min_gain cuts.
    [(_, _, _, no_child)] = drafter(child_id=order[1], stop_ids={order[2]}).propose([(7, tokens, 1)], siblings=[2])
    assert no_child == []
    cut = first[1][2] + 1e-4
    [(_, _, _, cut_siblings)] = drafter().propose([(7, tokens, 3)], siblings=[2], sibling_gain=cut)
    assert [t for _, t, _ in cut_siblings] == [t for _, t, g in siblings if g >= cut] and cut_siblings
    # A sampled ask's siblings are drawn after its token from the same q without replacement, with a
    # chance that never depends on the draw: the first sibling after the likeliest token follows q
    # without that token.
    d, n, seen = drafter(), 3000, Counter()
    for seed in range(n):
        [(drawn, _, _, sampled)] = d.propose([(7, tokens, 1)], sampling=[(1.0, torch.Generator().manual_seed(seed))],
                                             siblings=[2])
        assert len(sampled) == 2 and len({drawn[0]} | {t for _, t, _ in sampled}) == 3
        assert all(g == pytest.approx(d.sibling_rate) for *_, g in sampled), (sampled, d.sibling_rate)
        if drawn[0] == order[0]:
            seen[sampled[0][1]] += 1
    rest = q.clone()
    rest[order[0]] = 0
    rest /= rest.sum()
    m = sum(seen.values())
    assert m > 300 and order[0] not in seen
    for token, k in seen.items():
        share = float(rest[token])
        assert abs(k - m * share) < 4.5 * (m * share * (1 - share)) ** 0.5 + 1, (token, k, m * share)
    # Their chance is the rate at which drawn siblings have been taken: rarely taken, none pays.
    prior = d.sibling_rate
    d.record(1, 3, 1, siblings_fed=200, siblings_taken=2)
    assert d.sibling_rate < prior / 5
    [(_, _, _, none)] = d.propose([(7, tokens, 1)], sampling=[(1.0, torch.Generator().manual_seed(0))], siblings=[2],
                                  sibling_gain=prior / 2)
    assert none == []


def test_threads_drafted_together_get_the_chains_each_gets_alone():
    """The drafter puts every asking thread through one pass per chain step (eagle.py): each
    thread's chain and confidences are what it would get drafted on its own, and a `min_gain`
    cuts chains before their first token below it."""
    from parafork.engine.eagle import HeadDrafter

    head, embed = _random_head(2)
    contexts = {1: 12, 2: 7, 3: 10}  # thread id -> context length (the last token pending)
    tokens = {t: torch.randint(0, CONFIG.draft_vocab_size, (n,)).tolist() for t, n in contexts.items()}
    aux = {t: torch.randn(n - 1, 3 * CONFIG.hidden_size) for t, n in contexts.items()}

    def drafter():
        d = HeadDrafter(head, lambda ids: embed[ids], fork_id=-1, stop_ids=set(), child_id=-2)
        for t in contexts:
            d.observe(t, 0, tokens[t][:-1], aux[t])
        return d

    alone = {t: drafter().propose([(t, tokens[t], 4)])[0] for t in contexts}
    together = drafter().propose([(t, tokens[t], 4) for t in contexts])
    for (draft, conf, _, _), t in zip(together, contexts):
        assert draft == alone[t][0] and len(draft) == 4
        assert conf == pytest.approx(alone[t][1], rel=1e-5)
    # A second round after two more verified tokens each: extensions of several rows, together.
    d1, d2 = drafter(), drafter()
    for d in (d1, d2):
        d.propose([(t, tokens[t], 4) for t in contexts])
    grown = {t: tokens[t] + torch.randint(0, CONFIG.draft_vocab_size, (2,)).tolist() for t in contexts}
    more = {t: torch.randn(2, 3 * CONFIG.hidden_size) for t in contexts}
    for d in (d1, d2):
        for t in contexts:
            d.observe(t, contexts[t] - 1, grown[t][contexts[t] - 1:-1], more[t])
    assert [x[0] for x in d1.propose([(t, grown[t], 3) for t in contexts])] == \
        [d2.propose([(t, grown[t], 3)])[0][0] for t in contexts]
    # min_gain: each chain stops before its first token less confident than that.
    cut = 0.5 * min(c[0] for _, c, _, _ in together)
    for (draft, conf, _, _), (full, full_conf, _, _) in zip(drafter().propose([(t, tokens[t], 4) for t in contexts], min_gain=cut),
                                                 together):
        assert draft == [x for x, c in zip(full, full_conf) if c >= cut]


def test_soft_labels_are_the_targets_penalized_distribution_over_the_draft_vocabulary():
    """train.py's soft labels, from the stored final states, against the engine's own penalty
    code (sampler.penalize_row) applied to the full vocabulary's logits over each position's
    context, then cut to the draft vocabulary: step j at t gets the distribution of the token
    at t + j + 2, the context counted from the answer's start, control tokens never penalized."""
    from parafork.draft.train import Sequence, SoftLabels, tensors
    from parafork.engine.sampler import penalize_row

    torch.manual_seed(3)
    V, h, steps = CONFIG.vocab_size, CONFIG.hidden_size, 3
    draft = torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 17, 19, 23, 29])
    control = [2, 3]  # e.g. [Fork], [Child]
    embed = torch.randn(V, h)
    # One root of 14 tokens (the prompt 4 of them), tokens repeating so the penalties bite.
    tokens = torch.tensor([1, 5, 7, 9, 5, 5, 2, 7, 13, 5, 3, 7, 7, 29])
    shard = {"tokens": tokens.int(), "aux": torch.randn(14, 3 * h).bfloat16(), "final": torch.randn(14, h).bfloat16()}
    q = Sequence(0, torch.arange(14), first_label=4, held_out=False, answer_start=4)
    t2d = torch.full((V,), -100)
    t2d[draft] = torch.arange(len(draft))
    penalized = torch.tensor([t not in control for t in draft.tolist()])
    soft = SoftLabels(embed[draft], penalized, frequency=0.7, presence=0.4)
    _, _, labels, targets = tensors([shard], [q], embed, t2d, steps, soft)
    final = shard["final"].float()
    for j in range(steps):
        for t in range(14 - j - 2):
            p = t + j + 1  # the position whose distribution is over the token at t + j + 2
            row = (final[p] @ embed.T).numpy().copy()
            penalize_row(row, tokens[:p + 1].tolist(), 4, control, 0.7, 0.4, 1.0)
            want = torch.log_softmax(torch.from_numpy(row)[draft], -1)
            torch.testing.assert_close(targets[j, 0, t], want, atol=1e-4, rtol=1e-4)
    assert labels[0, 0, 1] == -100 and labels[0, 0, 2] == t2d[tokens[4]]  # labels start at the answer


def test_the_row_kernels_pass_drafts_what_the_fp32_pass_drafts():
    """With the row kernel the head runs in bf16 through the target's fused calls, one call per
    op for every asking thread (eagle.py); its chains are the fp32 path's and its confidences
    close: threads fed in pieces, drafted together, extended by several rows, and a child that
    takes its parent's cache below its `[Fork]`. Every slot is back in the pool at the end."""
    from parafork.engine.eagle import HeadDrafter
    from parafork.runners import row_kernel

    kernel = row_kernel.load()
    if kernel is None:
        pytest.skip(f"the row kernel is not built here: {row_kernel.unavailable()}")
    config = HeadConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=300,
                        draft_vocab_size=40, aux_layers=(0, 1, 2), max_position_embeddings=256)
    torch.manual_seed(3)
    head = EagleHead(config)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    head.set_vocabulary(list(range(40)))
    embed = torch.randn(300, 64)
    fork = 7
    contexts = {1: 30, 2: 9, 3: 21}
    tokens = {t: torch.randint(8, 40, (n,)).tolist() for t, n in contexts.items()}
    tokens[1][12] = fork
    aux = {t: torch.randn(n + 2, 3 * 64) for t, n in contexts.items()}
    child = tokens[1][:13] + [11, 12, 13]  # (its own tokens after the fork)
    child_aux = torch.randn(3, 3 * 64)

    def run(k):
        d = HeadDrafter(head, lambda ids: embed[ids], fork_id=fork, stop_ids=set(), child_id=-2, kernel=k)
        assert (d.kernel is None) == (k is None)
        for t, n in contexts.items():
            d.observe(t, 0, tokens[t][:n // 2], aux[t][:n // 2])
            d.observe(t, n // 2, tokens[t][n // 2:n - 1], aux[t][n // 2:n - 1])
        out = d.propose([(t, tokens[t], 4) for t in contexts])
        grown = {t: tokens[t] + [9, 10] for t in contexts}
        for t, n in contexts.items():
            d.observe(t, n - 1, grown[t][n - 1:n + 1], aux[t][n - 1:n + 1])
        d.fork(1, 4, 12)
        d.observe(4, 13, child[13:15], child_aux[:2])
        out += d.propose([(t, grown[t], 3) for t in contexts] + [(4, child, 4)])
        for t in (1, 2, 3, 4):
            d.release(t)
        assert d.states == {} and sorted(d.free) == list(range(len(d.pool)))
        return out

    fp32, bf16 = run(None), run(kernel)
    assert [d.tokens for d in bf16] == [d.tokens for d in fp32] and all(d.tokens for d in fp32)
    for a, b in zip(bf16, fp32):
        assert a.gains == pytest.approx(b.gains, abs=0.05)
