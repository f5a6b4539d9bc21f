"""Coarse search against independent brute force and the paper's published results."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from comflp.errors import ComflpError
from comflp.search import beam, check_matrix, exact, exhaustive, greedy, random_search, score, score_masks

REFERENCE = Path(__file__).resolve().parent / "data" / "paper"


def brute_scores(m: np.ndarray, k: int) -> list[tuple[tuple[int, ...], float]]:
    """Every K-subset in combinations order with its mean block score, by plain loops."""
    L = m.shape[0] - 1
    out = []
    for combo in itertools.combinations(range(1, L + 1), k):
        blocks, start = [], combo[0]
        for prev, cur in zip(combo, combo[1:]):
            if cur != prev + 1:
                blocks.append((start, prev))
                start = cur
        blocks.append((start, combo[-1]))
        total = 0
        for a, b in blocks:
            total += float(m[a - 1][b])
        out.append((combo, total / len(blocks)))
    return out


def _sym(L: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.random((L + 1, L + 1))
    m = (a + a.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


@pytest.mark.parametrize("L,k,seed", [(5, 2, 0), (8, 3, 1), (10, 5, 2), (12, 6, 3), (13, 1, 4), (14, 10, 5),
                                      (16, 8, 6), (16, 3, 7), (9, 8, 8), (11, 4, 9)])
def test_exact_equals_brute_force_including_order(L: int, k: int, seed: int) -> None:
    m = _sym(L, seed)
    ranked = sorted(brute_scores(m, k), key=lambda cs: (-cs[1], cs[0]))[:10]
    got = exact(m, k, 10).candidates
    assert [tuple(c.pruned) for c in got] == [c for c, _ in ranked]
    assert [c.score for c in got] == pytest.approx([s for _, s in ranked], abs=1e-12)


def test_exact_with_ties() -> None:
    m = np.ones((9, 9))  # every set ties: order falls back to ascending layer lists
    got = exact(m, 3, 5).candidates
    assert [c.pruned for c in got] == [list(c) for c in itertools.combinations(range(1, 9), 3)][:5]


def test_score_masks_is_bit_equal_to_the_loop() -> None:
    m = _sym(12, 11).astype(np.float32)
    sets = [list(c) for c in itertools.combinations(range(1, 13), 5)]
    masks = np.zeros((len(sets), 12), dtype=bool)
    for i, s in enumerate(sets):
        masks[i, np.array(s) - 1] = True
    vec = score_masks(m.astype(np.float64), masks)
    assert all(vec[i] == score(m, s) for i, s in enumerate(sets))


@pytest.mark.parametrize("name", ["dc_mat_mean_bs4_iter10.npy", "dc_mat_mean_bs32_iter10.npy",
                                  "cca_mat_9600U_svthre0.99.npy", "cca_mat_80T_svthre0.99.npy"])
def test_exhaustive_top10_on_paper_matrices_equals_brute_force(name: str) -> None:
    m = np.load(REFERENCE / name)
    brute = brute_scores(m, 6)
    order = np.argsort([s for _, s in brute])[-10:][::-1]  # the paper's ranking
    got = exhaustive(m, 6, 10).candidates
    assert [tuple(c.pruned) for c in got] == [brute[i][0] for i in order]
    assert [c.score for c in got] == [brute[i][1] for i in order]


def _blocks(cands):
    return [[list(b) for b in c.blocks] for c in cands]


def test_paper_published_candidates() -> None:
    """Candidates and scores from the paper's search_strategy/log/*.log files."""
    dc32 = np.load(REFERENCE / "dc_mat_mean_bs32_iter10.npy")
    top = exhaustive(dc32, 6, 10).candidates
    assert top[0].score == 0.9710103154182435 and top[9].score == 0.9612265944480896
    assert _blocks(top)[:2] == [[[1, 1], [3, 4], [7, 7], [9, 9], [11, 11]], [[1, 2], [4, 4], [7, 7], [9, 9], [11, 11]]]
    assert greedy(dc32, 6).path == [[9], [3, 9], [3, 7, 9], [3, 7, 9, 11], [1, 3, 7, 9, 11], [1, 3, 4, 7, 9, 11]]
    svcca = np.load(REFERENCE / "cca_mat_9600U_svthre0.99.npy")
    assert greedy(svcca, 6).path[-1] == [1, 3, 5, 7, 9, 11]
    dc4 = np.load(REFERENCE / "dc_mat_mean_bs4_iter10.npy")
    assert _blocks(beam(dc4, 6, 10).candidates) == [
        [[2, 3], [5, 5], [7, 7], [9, 9], [11, 11]], [[2, 4], [7, 7], [9, 9], [11, 11]],
        [[2, 2], [4, 4], [7, 7], [9, 9], [11, 12]], [[3, 3], [5, 5], [7, 7], [9, 9], [11, 12]],
        [[1, 1], [3, 3], [5, 5], [7, 7], [9, 9], [11, 11]], [[2, 2], [4, 5], [7, 7], [9, 9], [11, 11]],
        [[2, 2], [5, 5], [7, 7], [9, 9], [11, 12]], [[2, 3], [5, 5], [7, 7], [9, 9], [12, 12]],
        [[2, 2], [4, 4], [6, 7], [9, 9], [11, 11]], [[1, 1], [3, 4], [7, 7], [9, 9], [11, 11]]]


def test_greedy_and_beam_hand_checked() -> None:
    # 3 layers; M[a-1][b]: pruning layer 2 alone scores M[1][2] = 0.9 (best single), then
    # adding 1 gives block [1,2] -> M[0][2] = 0.2, adding 3 gives [2,3] -> M[1][3] = 0.5.
    m = np.array([[1.0, 0.8, 0.2, 0.1], [0.8, 1.0, 0.9, 0.5], [0.2, 0.9, 1.0, 0.7], [0.1, 0.5, 0.7, 1.0]])
    assert greedy(m, 2).path == [[2], [2, 3]]
    # beam keeps [1] (0.8) too, whose extension [1, 3] scores (0.8 + 0.7) / 2 = 0.75 > 0.5
    b = beam(m, 2, beam_size=2).candidates
    assert [c.pruned for c in b] == [[1, 3], [2, 3]] and b[0].score == pytest.approx(0.75)


def test_beam_merges_duplicates() -> None:
    m = _sym(6, 3)
    cands = beam(m, 3, beam_size=10).candidates
    assert len({tuple(c.pruned) for c in cands}) == len(cands) == 10


def test_random_is_seeded_and_distinct() -> None:
    m = _sym(10, 1)
    a, b = random_search(m, 4, 10, seed=3), random_search(m, 4, 10, seed=3)
    assert [c.pruned for c in a.candidates] == [c.pruned for c in b.candidates]
    assert len({tuple(c.pruned) for c in a.candidates}) == 10
    assert all(c.score == score(m, c.pruned) for c in a.candidates)


def test_errors() -> None:
    m = _sym(6, 0)
    with pytest.raises(ComflpError, match="need 0 < K < 6"):
        exhaustive(m, 6)
    with pytest.raises(ComflpError, match="need 0 < K < 6"):
        exact(m, 0)
    with pytest.raises(ComflpError, match="7x7 but a 12-layer model needs 13x13"):
        check_matrix(m, 12)
    bad = m.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ComflpError, match="NaN"):
        check_matrix(bad)


class _GraniteRule:
    """Granite Speech's rule written out: its CTC output is fed back after layer L // 2, which must stay after
    kept layer (L - k) // 2, so exactly L // 2 - (L - k) // 2 of the pruned layers lie in 1..L // 2."""

    def __init__(self, L: int, k: int):
        self.half, self.below, self.k = L // 2, L // 2 - (L - k) // 2, k

    def __call__(self, pruned) -> bool:
        return sum(1 for p in pruned if p <= self.half) == self.below

    def reachable(self, pruned, k: int) -> bool:
        under = sum(1 for p in pruned if p <= self.half)
        return under <= self.below and len(pruned) - under <= self.k - self.below


def _granite_rule(L: int, k: int) -> _GraniteRule:
    return _GraniteRule(L, k)


@pytest.mark.parametrize("L,k,seed", [(8, 3, 1), (12, 6, 3), (16, 8, 6), (11, 4, 9)])
def test_every_mode_returns_only_allowed_sets_and_exact_the_best_of_them(L: int, k: int, seed: int) -> None:
    """A model that cannot prune every set (Granite): exact and exhaustive give the top-N of the allowed sets
    (brute force over them), rand draws only allowed ones, greedy and beam end on allowed ones."""
    m, allowed = _sym(L, seed), _granite_rule(L, k)
    ranked = sorted(((c, s) for c, s in brute_scores(m, k) if allowed(c)), key=lambda cs: (-cs[1], cs[0]))[:10]
    assert 10 <= len([c for c, _ in brute_scores(m, k) if allowed(c)]) < math.comb(L, k)
    got = exact(m, k, 10, allowed=allowed).candidates
    assert [tuple(c.pruned) for c in got] == [c for c, _ in ranked]
    assert [c.score for c in got] == pytest.approx([s for _, s in ranked], abs=1e-12)
    assert {tuple(c.pruned) for c in exhaustive(m, k, 10, allowed=allowed).candidates} == {c for c, _ in ranked}
    for result in (random_search(m, k, 10, allowed=allowed), greedy(m, k, allowed=allowed),
                   beam(m, k, 5, allowed=allowed)):
        assert result.candidates and all(allowed(c.pruned) for c in result.candidates)
        assert all(c.score == pytest.approx(score(m, c.pruned), abs=1e-12) for c in result.candidates)
    # a plain predicate (no reachable): greedy may end where no allowed set is one layer away
    plain = lambda pruned: allowed(pruned)  # noqa: E731
    assert all(plain(c.pruned) for c in beam(m, k, 10, allowed=plain).candidates)
    # with nothing refused, every mode is the paper's, unchanged
    assert exact(m, k, 10, allowed=lambda s: True).candidates == exact(m, k, 10).candidates


def test_granite_speech_search_offers_only_sets_it_can_prune(tmp_path: Path) -> None:
    """The model's refusals, read from its config alone, keep the coarse search to sets `comflp prune` takes:
    each of the top candidates prunes, and the best unrestricted set (refused by prune) is not among them."""
    from comflp.cli.search import _expressible
    from comflp.model import prune

    from tiny_speechllm import tiny_speech_llm

    model = tiny_speech_llm("granite_speech")
    model.save_pretrained(tmp_path / "granite")
    allowed = _expressible(tmp_path / "granite", "encoder")
    assert _expressible(tmp_path / "granite", "decoder") is None  # its LLM's layers: any set
    m = np.eye(5)
    m[2, 4] = m[4, 2] = 0.9  # pruning layers 3 and 4 scores best; it moves the feedback point
    best = exact(m, 2, 1).candidates[0].pruned
    assert best == [3, 4]
    with pytest.raises(ComflpError, match="feeds its CTC output back"):
        prune(model, best)
    found = exact(m, 2, 4, allowed=allowed).candidates
    assert len(found) == 4 and best not in [c.pruned for c in found]
    for c in found:
        assert allowed(c.pruned) and prune(model, c.pruned) is not None
    # the model's own rule agrees with the rule written out, set by set, partial sets too
    rule = _granite_rule(4, 2)
    assert all(allowed(s) == rule(s) for s in itertools.combinations(range(1, 5), 2))
    assert all(allowed.reachable(s, 2) == rule.reachable(s, 2) for s in itertools.combinations(range(1, 5), 1))
    assert greedy(m, 2, allowed=allowed).candidates[0].pruned in [c.pruned for c in found]


@pytest.mark.parametrize("family", ["granite_speech", "granite_speech_plus"])
def test_allowed_is_what_prune_accepts_and_reachable_never_rules_out_an_allowed_set(family: str) -> None:
    """Every set of the tiny Granite encoder: allowed exactly when pruning it succeeds; every part of an allowed
    set is reachable (so greedy and beam never drop a partial set that could have become one)."""
    from comflp.model import prune
    from comflp.model.layers import expressible

    from tiny_speechllm import tiny_speech_llm

    model = tiny_speech_llm(family)
    allowed = expressible(model, "encoder")
    for k in (1, 2, 3):
        for s in itertools.combinations(range(1, 5), k):
            try:
                prune(model, list(s))
                pruned = True
            except ComflpError:
                pruned = False
            assert allowed(s) == pruned, (k, s)
            if pruned:
                assert all(allowed.reachable(part, k) for j in range(k) for part in itertools.combinations(s, j))
