"""Coarse search: find the pruning strategies that score best on a correlation matrix.

The objective (the paper's, and the only scoring function here): a strategy
prunes a set of 1-based layers whose maximal runs are blocks ``[a, b]``;
pruning block [a, b] connects hidden state a-1 straight to layer b+1, so the
block scores ``M[a-1][b]`` and the strategy scores the mean over its blocks.
Scores are accumulated block by block, left to right, in float64, exactly as
the paper's loop did, so equal inputs give bit-equal scores and the paper's
``np.argsort`` tie-breaking is reproduced.

Modes:

- ``exhaustive``: all C(L, K) sets in ``itertools.combinations`` order,
  vectorised; top-N as ``np.argsort(scores)[-N:][::-1]`` (the paper).
- ``greedy``: prune one layer at a time, each time the one whose addition
  scores best (the paper's greedy = beam of size 1).
- ``beam``: the paper's beam search: extend every beam by every remaining
  layer, merge duplicate sets (first occurrence kept), keep the ``beam_size``
  best by ``np.argsort``.
- ``exact``: the exact top-N of the same objective without enumeration
  (Dinkelbach-style parametric search: a set's mean is >= lam iff
  ``sum of (block score - lam) >= 0``, and an N-best dynamic programme over
  (layer, pruned count) enumerates every set with that sum >= 0).
- ``rand``: N distinct random sets (seeded), the paper's baseline.

Every mode takes ``allowed``, a predicate on pruned sets, for a model that cannot express every set (Granite
Speech's CTC feedback must stay after the same kept layer, :func:`comflp.model.layers.expressible`): only
allowed sets are returned. ``exhaustive`` and ``rand`` draw among the allowed sets, ``exact`` widens its
top-N until N allowed sets are found (the exact top N of the allowed sets), ``greedy``/``beam`` choose among
allowed sets at their last step, and before it among the partial sets ``allowed.reachable(set, k)`` says can
still grow into one, where the predicate has that method.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import ComflpError
from .strategy import Candidate, check_prune_count, to_blocks

SEARCH_MODES = ("exhaustive", "greedy", "beam", "exact", "rand", "linspace")
Allowed = Callable[[Sequence[int]], bool]  # a predicate on 1-based pruned sets (see the module docstring)


def _none_allowed(mode: str, k: int, num_layers: int) -> ComflpError:
    return ComflpError(f"{mode} search found no set of {k} of {num_layers} layers this model can prune (its "
                       f"family refuses the others)" + ("; --search_mode exact searches them all"
                                                        if mode in ("greedy", "beam") else ""))
MAX_EXHAUSTIVE = 5_000_000


def check_matrix(matrix: np.ndarray, num_layers: int | None = None, *, name: str = "matrix") -> np.ndarray:
    """The matrix as float64 [L+1, L+1]; ComflpError for a wrong shape or NaN/inf."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ComflpError(f"{name} must be square, got shape {m.shape}")
    if num_layers is not None and m.shape[0] != num_layers + 1:
        raise ComflpError(f"{name} is {m.shape[0]}x{m.shape[1]} but a {num_layers}-layer model needs "
                          f"{num_layers + 1}x{num_layers + 1} (hidden states 0..{num_layers})")
    if not np.all(np.isfinite(m)):
        raise ComflpError(f"{name} contains NaN or infinite values")
    return m.astype(np.float64)


def score(matrix: np.ndarray, pruned: Sequence[int]) -> float:
    """Mean over the blocks [a, b] of ``pruned`` of ``matrix[a-1][b]``.

    >>> m = np.arange(16, dtype=float).reshape(4, 4)
    >>> score(m, [1, 2])  # one block [1, 2] -> m[0][2]
    2.0
    >>> score(m, [1, 3])  # blocks [1,1], [3,3] -> (m[0][1] + m[2][3]) / 2
    6.0
    """
    blocks = to_blocks(pruned)
    total = 0.0
    for a, b in blocks:
        total += float(matrix[a - 1][b])
    return total / len(blocks)


def score_masks(matrix: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """:func:`score` of many sets at once. masks: [n, L] bool (column i = layer i+1) -> [n] float64.

    Block weights are laid out left to right per row (zero-padded) and summed
    with a sequential ``cumsum``, which adds in the same order as the loop in
    :func:`score` and so gives bit-equal results.
    """
    n, L = masks.shape
    padded = np.zeros((n, L + 2), dtype=np.int8)
    padded[:, 1:-1] = masks
    step = np.diff(padded, axis=1)  # +1 at a block start (column a-1 -> layer a), -1 after its end
    rs, cs = np.nonzero(step == 1)
    re, ce = np.nonzero(step == -1)
    starts, ends = cs + 1, ce  # 1-based first and last pruned layer of each block
    counts = np.bincount(rs, minlength=n)
    slot = np.arange(len(rs)) - np.repeat(np.cumsum(counts) - counts, counts)
    weights = np.zeros((n, max(int(counts.max(initial=0)), 1)))
    weights[rs, slot] = matrix[starts - 1, ends]
    return np.cumsum(weights, axis=1)[:, -1] / np.maximum(counts, 1)


def _to_mask(sets: Sequence[Sequence[int]], num_layers: int) -> np.ndarray:
    masks = np.zeros((len(sets), num_layers), dtype=bool)
    for i, s in enumerate(sets):
        masks[i, np.asarray(s, dtype=int) - 1] = True
    return masks


@dataclass(frozen=True)
class SearchResult:
    """Candidates best first, and for greedy/beam the best set after each step."""

    candidates: list[Candidate]
    mode: str
    path: list[list[int]] | None = None


def exhaustive(matrix: np.ndarray, k: int, top_n: int = 10, *, allowed: Allowed | None = None) -> SearchResult:
    """All C(L, K) sets (the ``allowed`` ones); top-N by the paper's ``np.argsort`` ranking."""
    m = check_matrix(matrix)
    L = m.shape[0] - 1
    check_prune_count(L, k)
    total = math.comb(L, k)
    if total > MAX_EXHAUSTIVE:
        raise ComflpError(f"exhaustive search over C({L},{k}) = {total:,} sets is too large; use --search_mode exact")
    combos = np.array(list(itertools.combinations(range(1, L + 1), k)), dtype=np.int64)
    if allowed is not None:
        combos = combos[np.array([allowed(c) for c in combos.tolist()], dtype=bool)]
        if not len(combos):
            raise _none_allowed("exhaustive", k, L)
        total = len(combos)
    masks = np.zeros((total, L), dtype=bool)
    masks[np.repeat(np.arange(total), k), combos.ravel() - 1] = True
    scores = score_masks(m, masks)
    top = np.argsort(scores)[-top_n:][::-1]
    return SearchResult([Candidate(combos[i].tolist(), float(scores[i])) for i in top], "exhaustive")


def beam(matrix: np.ndarray, k: int, beam_size: int = 10, *, allowed: Allowed | None = None) -> SearchResult:
    """The paper's beam search (greedy is ``beam_size=1``); returns the final beams, best first.

    Each step extends every beam (in beam order) by every remaining layer (in
    ascending order), drops sets already produced earlier in that step, and
    keeps ``np.argsort(scores)[-beam_size:][::-1]``. New sets are scored
    incrementally from their parent's blocks, in the same left-to-right order.
    The last step keeps only ``allowed`` sets, the steps before it the partial sets that can still grow into
    one (``allowed.reachable``, where the predicate has it).
    """
    m = check_matrix(matrix)
    L = m.shape[0] - 1
    check_prune_count(L, k)
    if beam_size < 1:
        raise ComflpError(f"--beam_size must be positive, got {beam_size}")
    rng = np.random.default_rng(0)
    zobrist = rng.integers(1, 2**63 - 1, size=L + 1, dtype=np.int64)  # set hashes for duplicate merging
    beams = [np.zeros(L + 2, dtype=bool)]  # index = layer; 0 and L+1 are sentinels, never pruned
    hashes = [np.int64(0)]
    path: list[list[int]] = []
    top_scores = np.zeros(1)
    for step in range(k):
        parent, layer, scores = _extend_scores(m, beams)
        hs = np.array(hashes, dtype=np.int64)[parent] ^ zobrist[layer]
        _, first = np.unique(hs, return_index=True)
        keep = np.sort(first)  # first occurrence of each set, in generation order
        if allowed is not None:
            check = allowed if step == k - 1 else getattr(allowed, "reachable", None)
            if check is not None:
                grown = ([*np.flatnonzero(beams[parent[i]]).tolist(), int(layer[i])] for i in keep)
                keep = keep[[bool(check(sorted(g)) if step == k - 1 else check(g, k)) for g in grown]]
            if not len(keep):
                raise _none_allowed("greedy" if beam_size == 1 else "beam", k, L)
        parent, layer, scores, hs = parent[keep], layer[keep], scores[keep], hs[keep]
        top = np.argsort(scores)[-beam_size:][::-1]
        new_beams = []
        for i in top:
            mask = beams[parent[i]].copy()
            mask[layer[i]] = True
            new_beams.append(mask)
        beams, hashes, top_scores = new_beams, [hs[i] for i in top], scores[top]
        path.append((np.flatnonzero(beams[0]).tolist()))
    cands = [Candidate(np.flatnonzero(b).tolist(), float(s)) for b, s in zip(beams, top_scores)]
    return SearchResult(cands, "greedy" if beam_size == 1 else "beam", path)


def greedy(matrix: np.ndarray, k: int, *, allowed: Allowed | None = None) -> SearchResult:
    """The paper's greedy search: one layer at a time, the best-scoring addition each time."""
    return beam(matrix, k, beam_size=1, allowed=allowed)


def _extend_scores(m: np.ndarray, beams: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every one-layer extension of every beam, scored: (parent index, added layer, score).

    beams: masks [L+2] with kept sentinels at 0 and L+1. Candidates come in the
    paper's order (beam by beam, layers ascending). Each new set's block
    weights are laid out left to right (the parent's blocks with the one that
    the new layer creates, extends or merges) and summed with a sequential
    cumsum, so scores are bit-equal to :func:`score`.
    """
    parents, layers, scores = [], [], []
    for r, mask in enumerate(beams):
        layer = np.flatnonzero(~mask[1:-1]) + 1
        blocks = to_blocks(np.flatnonzero(mask).tolist())
        n = len(blocks)
        starts = np.array([a for a, _ in blocks], dtype=np.int64)
        ends = np.array([e for _, e in blocks], dtype=np.int64)
        w = np.zeros(n + 1)  # w[n] = 0 pads the rows
        w[:n] = m[starts - 1, ends]
        j = np.searchsorted(ends, layer)  # blocks entirely before the new layer
        left, right = mask[layer - 1], mask[layer + 1]
        prefix = j - left  # unchanged leading blocks
        suffix = j + right  # first unchanged trailing block
        new_start = np.where(left, starts[np.maximum(j - 1, 0)] if n else layer, layer)
        new_end = np.where(right, ends[np.minimum(j, max(n - 1, 0))] if n else layer, layer)
        t = np.arange(n + 1)[None, :]
        p = prefix[:, None]
        src = np.where(t < p, t, t - p - 1 + suffix[:, None])
        np.minimum(src, n, out=src)
        row = w[src]
        row[t == p] = m[new_start - 1, new_end]
        count = prefix + 1 + (n - suffix)
        parents.append(np.full(len(layer), r))
        layers.append(layer)
        scores.append(np.cumsum(row, axis=1)[:, -1] / count)
    return np.concatenate(parents), np.concatenate(layers), np.concatenate(scores)


def random_search(matrix: np.ndarray, k: int, top_n: int = 10, *, seed: int = 42,
                  allowed: Allowed | None = None) -> SearchResult:
    """N distinct random sets (the paper's 'rand' baseline), scored and listed in draw order.

    For C(L, K) up to the exhaustive limit this is the paper's draw
    (``np.random.seed(seed); np.random.choice(C(L,K), N, replace=False)`` over
    combinations in order, the ``allowed`` ones); above it, sets are drawn directly (allowed ones kept).
    """
    m = check_matrix(matrix)
    L = m.shape[0] - 1
    check_prune_count(L, k)
    total = math.comb(L, k)
    top_n = min(top_n, total)
    rs = np.random.RandomState(seed)
    if total <= MAX_EXHAUSTIVE:
        combos = list(itertools.combinations(range(1, L + 1), k))
        if allowed is not None:
            combos = [c for c in combos if allowed(c)]
            if not combos:
                raise _none_allowed("rand", k, L)
        top_n = min(top_n, len(combos))
        sets = [list(combos[i]) for i in rs.choice(np.arange(len(combos)), top_n, replace=False)]
    else:
        seen: set[tuple[int, ...]] = set()
        sets = []
        draws = 0
        while len(sets) < top_n:
            draws += 1
            if draws > 1000 * top_n:  # the allowed sets are too rare to draw
                raise _none_allowed("rand", k, L)
            s = tuple(sorted((rs.choice(L, k, replace=False) + 1).tolist()))
            if s not in seen:
                seen.add(s)
                if allowed is None or allowed(s):
                    sets.append(list(s))
    scores = score_masks(m, _to_mask(sets, L))
    return SearchResult([Candidate(s, float(v)) for s, v in zip(sets, scores)], "rand")


def linspace(matrix: np.ndarray, k: int, *, allowed: Allowed | None = None) -> SearchResult:
    """distil-whisper's baseline: keep L-K evenly spaced layers, the first and the last always.

    Kept (0-based) = ``np.linspace(0, L - 1, L - K, dtype=int)``, as distil-whisper picks its student's
    layers; the one candidate is the other K layers (1-based), scored on ``matrix`` [L+1, L+1] like any other.

    >>> linspace(np.eye(13), 6).candidates[0].pruned
    [2, 4, 6, 8, 10, 11]
    """
    m = check_matrix(matrix)
    L = m.shape[0] - 1
    check_prune_count(L, k)
    kept = set(np.linspace(0, L - 1, L - k, dtype=int).tolist())
    pruned = [i + 1 for i in range(L) if i not in kept]  # the spacing is >= 1, so the kept layers are distinct
    if allowed is not None and not allowed(pruned):
        raise ComflpError(f"linspace's set {pruned} of {L} layers cannot be pruned from this model (its family "
                          "refuses it): choose another --search_mode")
    return SearchResult([Candidate(pruned, float(score_masks(m, _to_mask([pruned], L))[0]))], "linspace")


# ------------------------------------------------------------------------------------------------
# exact top-N


def _nbest_dp(m: np.ndarray, k: int, lam: float, width: int) -> list[tuple[float, list[int]]]:
    """The ``width`` best sets of exactly k pruned layers by ``sum over blocks (M[a-1][b] - lam)``.

    F[i][c] holds the best values of layers 1..i-1 with layer i kept and c
    pruned; a block [a, i-1] comes from F[a-1] (layer a-1 kept), so every
    block is maximal. Layer 0 and L+1 are kept sentinels. Returns (value, set)
    best first; fewer than ``width`` when fewer sets exist.
    """
    L = m.shape[0] - 1
    neg = -np.inf
    F = np.full((L + 2, k + 1, width), neg)
    src_a = np.full((L + 2, k + 1, width), -2, dtype=np.int64)  # -1: from F[i-1]; a >= 1: block [a, i-1]
    src_r = np.zeros((L + 2, k + 1, width), dtype=np.int64)
    F[0, 0, 0] = 0.0
    for i in range(1, L + 2):
        # option 1: layer i-1 kept (i-1 >= 0): copy F[i-1]
        vals = [F[i - 1]]
        a_ids = [np.full((k + 1, width), -1)]
        r_ids = [np.broadcast_to(np.arange(width), (k + 1, width))]
        # option 2: block [a, i-1] for a = 1..i-1, from F[a-1][c - len]
        if i >= 2:
            a = np.arange(max(1, i - k), i)  # a block holds at most k layers
            length = i - a  # pruned layers in the block
            w = m[a - 1, i - 1] - lam
            c = np.arange(k + 1)
            prev_c = c[None, :] - length[:, None]  # [A, k+1]
            ok = prev_c >= 0
            gathered = F[a[:, None] - 1, np.clip(prev_c, 0, k)]  # [A, k+1, width]
            gathered = np.where(ok[:, :, None], gathered + w[:, None, None], neg)
            vals.append(gathered.transpose(1, 0, 2).reshape(k + 1, -1))
            a_ids.append(np.broadcast_to(a[None, :, None], (k + 1, len(a), width)).reshape(k + 1, -1))
            r_ids.append(np.broadcast_to(np.arange(width)[None, None, :], (k + 1, len(a), width)).reshape(k + 1, -1))
        allv = np.concatenate(vals, axis=1)
        alla = np.concatenate(a_ids, axis=1)
        allr = np.concatenate(r_ids, axis=1)
        if allv.shape[1] > width:
            part = np.argpartition(-allv, width - 1, axis=1)[:, :width]
            sub = np.take_along_axis(allv, part, axis=1)
            order = np.take_along_axis(part, np.argsort(-sub, axis=1, kind="stable"), axis=1)
        else:
            order = np.argsort(-allv, axis=1, kind="stable")
        F[i] = np.take_along_axis(allv, order, axis=1)
        src_a[i] = np.take_along_axis(alla, order, axis=1)
        src_r[i] = np.take_along_axis(allr, order, axis=1)
    out = []
    for r in range(width):
        value = F[L + 1, k, r]
        if value == neg:
            break
        layers: list[int] = []
        i, c, rr = L + 1, k, r
        while i > 0:
            a = int(src_a[i, c, rr])
            nr = int(src_r[i, c, rr])
            if a == -1:
                i, rr = i - 1, nr
            else:
                layers.extend(range(a, i))
                c -= i - a
                i, rr = a - 1, nr
        out.append((float(value), sorted(layers)))
    return out


def exact(matrix: np.ndarray, k: int, top_n: int = 10, *, allowed: Allowed | None = None) -> SearchResult:
    """The exact top-N sets by score (ties by ascending layer list), without enumerating C(L, K); of the
    ``allowed`` sets: the top N' for N' = N, 4N, 16N, ... until N of them are allowed (or all sets are seen).

    Parametric search on the mean: with lam <= the N-th best score, every set
    scoring >= lam has ``sum(block - lam) >= 0``; when the N-best DP list at
    lam ends below 0 it holds all of them, and the answer is their top N.
    Otherwise lam rises to the N-th best score seen, or the list widens.
    """
    m = check_matrix(matrix)
    L = m.shape[0] - 1
    check_prune_count(L, k)
    if allowed is not None:
        wanted, width = top_n, top_n
        while True:
            found = [c for c in exact(m, k, width).candidates if allowed(c.pruned)]
            if len(found) >= wanted or width >= math.comb(L, k):
                break
            width *= 4
        if not found:
            raise _none_allowed("exact", k, L)
        return SearchResult(found[:wanted], "exact")
    top_n = min(top_n, math.comb(L, k))
    seen: dict[tuple[int, ...], float] = {}

    def run(lam: float, width: int) -> list[tuple[float, list[int]]]:
        found = _nbest_dp(m, k, lam, width)
        for _, s in found:
            seen.setdefault(tuple(s), score(m, s))
        return found

    width = max(2 * top_n, 16)
    run(0.0, width)  # any lam gives real sets whose scores bound the N-th best from below
    lam = sorted(seen.values(), reverse=True)[min(top_n, len(seen)) - 1]
    for _ in range(64):
        # a little below lam so that float rounding of the DP's sums cannot drop a tie
        found = run(lam - 1e-9 * (1.0 + abs(lam)), width)
        if len(found) < width or found[-1][0] < 0:
            break  # every set scoring >= lam is in `seen`
        nth = sorted(seen.values(), reverse=True)[top_n - 1]
        if nth > lam:
            lam = nth
        else:
            width *= 2
    else:  # pragma: no cover - each round raises lam or doubles the width
        raise RuntimeError("exact search did not converge")
    best = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    return SearchResult([Candidate(list(s), v) for s, v in best], "exact")


def search(matrix: np.ndarray, k: int, mode: str, *, top_n: int = 10, beam_size: int = 10, seed: int = 42,
           allowed: Allowed | None = None) -> SearchResult:
    """Dispatch to one search mode (``allowed``: the sets the model can prune, see the module docstring)."""
    if mode == "exhaustive":
        return exhaustive(matrix, k, top_n, allowed=allowed)
    if mode == "greedy":
        return greedy(matrix, k, allowed=allowed)
    if mode == "beam":
        return beam(matrix, k, beam_size, allowed=allowed)
    if mode == "exact":
        return exact(matrix, k, top_n, allowed=allowed)
    if mode == "rand":
        return random_search(matrix, k, top_n, seed=seed, allowed=allowed)
    if mode == "linspace":
        return linspace(matrix, k, allowed=allowed)
    raise ComflpError(f"unknown search mode {mode!r}; one of {', '.join(SEARCH_MODES)}")


@dataclass(frozen=True)
class Coarse:
    """The coarse search stage's result (candidates best first) and its seconds."""

    result: SearchResult
    seconds: float

    @property
    def candidates(self) -> list[Candidate]:
        return self.result.candidates

    def meta(self, *, measure: str, matrix: str, k: int) -> dict:
        """What a strategy file records of the coarse search: the mode, the measure that scored the strategies
        and the matrix file it came from."""
        return {"search_mode": self.result.mode, "select_measure": measure, "matrix": matrix,
                "coarse_seconds": self.seconds, "num_clip_layers": k}


def coarse(matrix: np.ndarray, k: int, *, mode: str = "exact", top_n: int = 10, beam_size: int = 10,
           seed: int = 42, allowed: Allowed | None = None) -> Coarse:
    """The coarse search stage: score pruning strategies of ``k`` layers on ``matrix`` [L+1, L+1] alone
    (:func:`search`), timed. Here rather than in :mod:`comflp.stages` (which re-exports it) so that a
    coarse-only search does not import transformers."""
    start = time.perf_counter()
    result = search(matrix, k, mode, top_n=top_n, beam_size=beam_size, seed=seed, allowed=allowed)
    return Coarse(result, time.perf_counter() - start)
