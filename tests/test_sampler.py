"""The sampler's draw against an independent oracle: the law it draws, not the order it keeps."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parafork.engine.sampler import NUCLEUS_CANDIDATES, draw, settle_offer

GRID = 8_000  # uniforms (i + 1/2) / GRID: each token's share of them is its probability to 1/GRID


def nucleus_law(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The oracle (the sampler's former code): sort, drop every token whose more likely tokens
    already hold top_p, renormalize."""
    if top_p < 1:
        values, order = probs.sort(descending=True)
        probs = probs.scatter(0, order[values.cumsum(0) - values >= top_p], 0.0)
    return probs / probs.sum()


def drawn_law(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    counts = torch.zeros(len(probs), dtype=torch.float64)
    for i in range(GRID):
        counts[draw(probs, top_p, (i + 0.5) / GRID)] += 1
    return counts / GRID


@settings(max_examples=20, deadline=None)
@given(vocab=st.integers(2, 60), zeros=st.integers(0, 30), sharp=st.floats(0.1, 6.0),
       top_p=st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.05]), seed=st.integers(0, 10_000))
def test_each_token_is_drawn_by_its_share_of_the_nucleus(vocab, zeros, sharp, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * sharp
    logits[torch.randperm(vocab, generator=g)[: min(zeros, vocab - 1)]] = float("-inf")  # banned tokens
    probs = torch.softmax(logits, -1)
    law = nucleus_law(probs, top_p).double()
    drawn = drawn_law(probs, top_p)
    assert torch.all((drawn - law).abs() <= 2 / GRID + 1e-6), (drawn - law).abs().max()
    assert not drawn[law == 0].any()  # never a banned token, nor one outside the nucleus


def test_a_nucleus_wider_than_its_candidates_is_found_whole():
    # A flat distribution: the most likely NUCLEUS_CANDIDATES tokens hold under top_p, so the
    # nucleus is found by the full sort, and tokens far past the candidates are drawn.
    vocab = 8 * NUCLEUS_CANDIDATES
    probs = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 0.3, -1)
    assert torch.topk(probs, NUCLEUS_CANDIDATES).values.sum() < 0.9
    law, drawn = nucleus_law(probs, 0.9).double(), drawn_law(probs, 0.9)
    assert int((law > 0).sum()) > 4 * NUCLEUS_CANDIDATES
    assert torch.all((drawn - law).abs() <= 2 / GRID + 1e-6)


def test_the_end_of_the_unit_interval_never_draws_a_banned_last_token():
    probs = torch.tensor([0.3, 0.7, 0.0, 0.0])
    for top_p in (1.0, 0.95):
        for u in (0.0, 1 - 1e-12):  # (1 - 1e-12 rounds to 1 in the float32 cumulative sums)
            assert draw(probs, top_p, u) in (0, 1)


def test_drawn_candidates_without_replacement_keep_p_and_are_kept_as_the_recursive_rule_says():
    """A draft token and its siblings, drawn from q one after another without replacement, settled
    against p (sampler.settle_offer, recursively): every token follows p's nucleus (chi-square),
    a candidate is the token exactly when it was kept, and the first two together are kept more
    often than the first alone. Settling the second against q itself, not q without the first,
    skews the law (the mutation this catches)."""
    p = torch.softmax(torch.tensor([1.0, 0.5, 0.2, 0.0, -0.5, -1.0, float("-inf")]), 0)
    q = torch.tensor([0.05, 0.1, 0.4, 0.05, 0.2, 0.05, 0.15])
    g = torch.Generator().manual_seed(1)
    n = 20_000

    def candidates() -> list[int]:
        first = int(torch.multinomial(q, 1, generator=g))
        rest = q.clone()
        rest[first] = 0
        second = int(torch.multinomial(rest / rest.sum(), 1, generator=g))
        rest[second] = 0
        return [first, second, int(torch.multinomial(rest / rest.sum(), 1, generator=g))]

    for top_p in (1.0, 0.8):
        law = nucleus_law(p, top_p)
        counts, first_kept, kept = torch.zeros(len(p)), 0, 0
        for _ in range(n):
            drawn = candidates()
            token = settle_offer(p, top_p, drawn, q, g)
            counts[token] += 1
            first_kept += token == drawn[0]
            kept += token in drawn
        assert counts[law == 0].sum() == 0
        expected = n * law[law > 0]
        chi2 = float(((counts[law > 0] - expected) ** 2 / expected).sum())
        assert chi2 < 22.5, chi2  # the 99.9% quantile of chi-square with <= 6 degrees of freedom
        rate = float(torch.minimum(law, q).sum())
        assert abs(first_kept - n * rate) < 4 * (n * rate * (1 - rate)) ** 0.5
        assert kept > first_kept + 0.1 * n  # the siblings add kept tokens


def test_a_drawn_draft_token_is_kept_by_the_speculative_sampling_rule():
    """Draft tokens drawn from q, settled against p: every token follows p's nucleus (chi-square),
    the draft token is kept exactly as often as sum(min(p, q)) says, and a token equals the draft
    token only where it was kept (the engine's loop reads acceptance off that)."""
    p = torch.softmax(torch.tensor([1.0, 0.5, 0.2, 0.0, -0.5, -1.0, float("-inf")]), 0)
    q = torch.tensor([0.05, 0.1, 0.4, 0.05, 0.2, 0.05, 0.15])  # mass on a banned token too
    g = torch.Generator().manual_seed(0)
    n = 20_000
    for top_p in (1.0, 0.8):
        law = nucleus_law(p, top_p)
        counts, kept = torch.zeros(len(p)), 0
        for d in torch.multinomial(q, n, replacement=True, generator=g).tolist():
            token = settle_offer(p, top_p, [d], q, g)
            counts[token] += 1
            kept += token == d
        assert counts[law == 0].sum() == 0
        expected = n * law[law > 0]
        chi2 = float(((counts[law > 0] - expected) ** 2 / expected).sum())
        assert chi2 < 22.5  # the 99.9% quantile of chi-square with <= 6 degrees of freedom
        rate = float(torch.minimum(law, q).sum())
        assert abs(kept - n * rate) < 4 * (n * rate * (1 - rate)) ** 0.5, (kept, n * rate)
