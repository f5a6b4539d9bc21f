"""Which measure predicts the damage: rank correlations between each measure's score and real CER.

A measure is useful for coarse search only if strategies it scores higher
lose less accuracy. This module samples strategies that cover every
measure's score range, decodes each on a labelled subset with the
shared-prefix engine (:class:`comflp.verify.FineSearch`) and reports, per
measure:

- Spearman's rho and Kendall's tau between score and CER (``scipy.stats``),
  each with a percentile-bootstrap 95% interval over strategies. Negative
  means the measure predicts well (higher score, lower CER).
- the top-1 regret: the CER of the strategy the measure scores best, minus
  the best CER among the sampled strategies.

Every score is the search objective (:func:`comflp.search.score`: the mean of
``M[a-1][b]`` over the strategy's blocks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats

from .errors import ComflpError
from .metrics import unusable_note
from .search import exact, score
from .strategy import check_prune_count


@dataclass(frozen=True)
class MeasureStats:
    """How well one measure's scores rank the sampled strategies by CER."""

    spearman: float
    spearman_ci95: tuple[float, float]
    kendall: float
    kendall_ci95: tuple[float, float]
    top1_regret: float
    best_scored: list[int]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spearman_ci95"] = list(self.spearman_ci95)
        d["kendall_ci95"] = list(self.kendall_ci95)
        return d


@dataclass(frozen=True)
class ScoredStrategy:
    """One sampled strategy: its pruned layers, CER and score under every measure."""

    pruned: list[int]
    cer: float
    scores: dict[str, float]

    def to_dict(self) -> dict:
        return {"pruned": list(self.pruned), "cer": self.cer, "scores": dict(self.scores)}


@dataclass
class MeasureReport:
    measures: dict[str, MeasureStats]
    strategies: list[ScoredStrategy]
    settings: dict = field(default_factory=dict)

    @property
    def unusable(self) -> str | None:
        """One line when every sampled strategy is broken: a rank correlation over broken models means nothing."""
        note = unusable_note([s.cer for s in self.strategies], what="sampled strategy")
        return None if note is None else note + "; the rank correlations below compare broken models"

    def to_dict(self) -> dict:
        return {"measures": {k: v.to_dict() for k, v in self.measures.items()},
                "strategies": [s.to_dict() for s in self.strategies], "settings": self.settings,
                "all_unusable": self.unusable is not None}

    def table(self) -> str:
        """The report as a fixed-width table, best predictor (most negative rho) first."""
        rows = [f"{'measure':<28} {'spearman':>9} {'95% CI':>17} {'kendall':>8} {'top-1 regret':>13}"]
        for name, m in sorted(self.measures.items(), key=lambda kv: kv[1].spearman):
            ci = f"[{m.spearman_ci95[0]:+.2f}, {m.spearman_ci95[1]:+.2f}]"
            rows.append(f"{name:<28} {m.spearman:>+9.3f} {ci:>17} {m.kendall:>+8.3f} "
                        f"{100 * m.top1_regret:>12.2f}%")
        return "\n".join(([self.unusable] if self.unusable else []) + rows)


def sample_strategies(matrices: dict[str, np.ndarray], k: int, num_strategies: int, *, seed: int = 0,
                      top_per_measure: int = 3) -> list[list[int]]:
    """Strategies (sorted 1-based pruned layers) covering every measure's score range.

    matrices: name -> [L+1, L+1]. The ``top_per_measure`` best strategies of
    each measure (exact search) come first, in measure order; seeded uniform
    random K-subsets of 1..L fill up to ``num_strategies`` (all distinct).
    """
    num_layers = next(iter(matrices.values())).shape[0] - 1
    check_prune_count(num_layers, k)
    total = math.comb(num_layers, k)
    if num_strategies > total:
        raise ComflpError(f"--num_strategies {num_strategies} exceeds the {total} strategies of {k} of "
                          f"{num_layers} layers")
    chosen: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()

    def add(pruned: Sequence[int]) -> None:
        key = tuple(sorted(pruned))
        if key not in seen and len(chosen) < num_strategies:
            seen.add(key)
            chosen.append(list(key))

    for m in matrices.values():
        for cand in exact(m, k, top_n=min(top_per_measure, total)).candidates:
            add(cand.pruned)
    rng = np.random.default_rng(seed)
    while len(chosen) < num_strategies:
        add((rng.choice(num_layers, size=k, replace=False) + 1).tolist())
    return chosen


def _bootstrap_ci(x: np.ndarray, y: np.ndarray, statistic, *, num_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``statistic(x, y)`` over resampled (x_i, y_i) pairs.

    Resamples where the statistic is undefined (a constant side) are skipped.
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    values = []
    for _ in range(num_resamples):
        idx = rng.integers(0, n, n)
        xs, ys = x[idx], y[idx]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        v = statistic(xs, ys)
        if np.isfinite(v):
            values.append(v)
    if not values:
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def rank_statistics(scores: Sequence[float], cers: Sequence[float], pruned: Sequence[Sequence[int]], *,
                    num_resamples: int = 1000, seed: int = 0) -> MeasureStats:
    """Spearman/Kendall of ``scores`` vs ``cers`` with bootstrap intervals, and the top-1 regret.

    scores, cers: [N] over the same N strategies (``pruned``). The best-scored
    strategy is the first with the highest score.
    """
    x, y = np.asarray(scores, dtype=np.float64), np.asarray(cers, dtype=np.float64)
    if len(x) < 3:
        raise ComflpError(f"rank correlations need at least 3 strategies, got {len(x)}")

    def rho(a, b):
        return stats.spearmanr(a, b).statistic

    def tau(a, b):
        return stats.kendalltau(a, b).statistic

    best = int(np.argmax(x))
    return MeasureStats(
        spearman=float(rho(x, y)), spearman_ci95=_bootstrap_ci(x, y, rho, num_resamples=num_resamples, seed=seed),
        kendall=float(tau(x, y)), kendall_ci95=_bootstrap_ci(x, y, tau, num_resamples=num_resamples, seed=seed),
        top1_regret=float(y[best] - y.min()), best_scored=list(pruned[best]))


def build_report(matrices: dict[str, np.ndarray], strategies: Sequence[Sequence[int]], cers: Sequence[float], *,
                 num_resamples: int = 1000, seed: int = 0, settings: dict | None = None) -> MeasureReport:
    """Score every strategy under every measure (the search objective) and compare with the CERs."""
    scored = [ScoredStrategy(list(p), float(c), {name: score(m, p) for name, m in matrices.items()})
              for p, c in zip(strategies, cers)]
    per_measure = {name: rank_statistics([s.scores[name] for s in scored], [s.cer for s in scored],
                                         [s.pruned for s in scored], num_resamples=num_resamples, seed=seed)
                   for name in matrices}
    return MeasureReport(per_measure, scored, dict(settings or {}))
