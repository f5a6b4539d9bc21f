"""measure-report: scores are the search objective, rank statistics are scipy's, intervals contain them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from comflp.report import build_report, rank_statistics, sample_strategies
from comflp.search import exhaustive


def _matrix(seed: int, n: int = 9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.8, 1.0, (n, n))
    m = (a + a.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _objective(m: np.ndarray, pruned: list[int]) -> float:
    """The paper's objective written out: split into maximal runs [a, b], average m[a-1][b]."""
    runs, start = [], None
    for layer in range(1, m.shape[0] + 1):
        inside = layer in pruned
        if inside and start is None:
            start = layer
        if not inside and start is not None:
            runs.append((start, layer - 1))
            start = None
    return float(np.mean([m[a - 1][b] for a, b in runs]))


def test_sampled_strategies_cover_each_measures_top_and_are_distinct() -> None:
    mats = {"a": _matrix(0), "b": _matrix(1)}
    sets = sample_strategies(mats, 3, 20, seed=4)
    assert len(sets) == 20 and len({tuple(s) for s in sets}) == 20
    assert all(len(s) == 3 and s == sorted(s) and 1 <= s[0] and s[-1] <= 8 for s in sets)
    for m in mats.values():
        assert exhaustive(m, 3, top_n=1).candidates[0].pruned in sets
    assert sample_strategies(mats, 3, 20, seed=4) == sets


def test_scores_equal_the_objective_and_statistics_equal_scipys() -> None:
    mats = {"a": _matrix(2), "b": _matrix(3)}
    sets = sample_strategies(mats, 4, 25, seed=1)
    rng = np.random.default_rng(7)
    cers = [0.2 - 0.5 * (_objective(mats["a"], s) - 0.9) + 0.01 * rng.standard_normal() for s in sets]
    report = build_report(mats, sets, cers, num_resamples=300, seed=0)
    for s in report.strategies:
        for name, m in mats.items():
            assert s.scores[name] == pytest.approx(_objective(m, s.pruned), abs=1e-12)
    for name in mats:
        scores = [s.scores[name] for s in report.strategies]
        st = report.measures[name]
        assert st.spearman == pytest.approx(stats.spearmanr(scores, cers).statistic)
        assert st.kendall == pytest.approx(stats.kendalltau(scores, cers).statistic)
        assert st.spearman_ci95[0] <= st.spearman <= st.spearman_ci95[1]
        assert st.kendall_ci95[0] <= st.kendall <= st.kendall_ci95[1]
        best = int(np.argmax(scores))
        assert st.top1_regret == pytest.approx(cers[best] - min(cers)) and st.best_scored == sets[best]
    assert report.measures["a"].spearman < -0.5  # built to predict: higher score, lower CER
    assert report.table().splitlines()[1].startswith("a ")
    d = report.to_dict()
    assert set(d) == {"measures", "strategies", "settings", "all_unusable"} and json.dumps(d)


def test_rank_statistics_need_three_strategies() -> None:
    from comflp.errors import ComflpError

    with pytest.raises(ComflpError, match="at least 3"):
        rank_statistics([0.1, 0.2], [0.3, 0.4], [[1], [2]])


def test_measure_report_command(tmp_path: Path) -> None:
    from conftest import make_corpus, save_plain, tiny_model

    from comflp.cli.report import main

    model = save_plain(tiny_model("wav2vec2-stable", seed=1), tmp_path / "m", tmp_path / "p")
    corpus = make_corpus(tmp_path / "c", n=6)
    np.savez(tmp_path / "x.npz", settings=np.array(json.dumps({"num_layers": 6})), dc=_matrix(5, 7),
             cka=_matrix(6, 7))
    np.save(tmp_path / "y.npy", _matrix(7, 7))
    out = main(["--measure_file", str(tmp_path / "x.npz"), "--measure_file", str(tmp_path / "y.npy"),
                "--num_clip_layers", "2", "--num_strategies", "8", "--model", str(model), "--verify_data_dir",
                str(corpus), "--test_num_batch", "2", "--verify_batch_size", "3", "--output", str(tmp_path / "r.json"),
                "--bootstrap", "50", "--quiet"])
    report = json.loads(out.read_text())
    assert set(report["measures"]) == {"dc", "cka", "y"} and len(report["strategies"]) == 8
    assert out.with_suffix(".png").is_file() and report["settings"]["verify_utterances"] == 6


def test_a_report_over_broken_strategies_says_so() -> None:
    mats = {"a": _matrix(2)}
    sets = sample_strategies(mats, 4, 6, seed=1)
    usable = build_report(mats, sets, [0.95, 0.99, 0.3, 1.2, 0.91, 0.97], num_resamples=50, seed=0)
    assert usable.unusable is None and usable.to_dict()["all_unusable"] is False
    broken = build_report(mats, sets, [0.95, 0.99, 0.9, 1.2, 0.91, 0.97], num_resamples=50, seed=0)
    assert broken.to_dict()["all_unusable"] is True
    assert broken.table().splitlines()[0].startswith("every sampled strategy is unusable before healing")
