"""The typed stages chain the engines exactly as running them by hand does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from comflp.data import read_corpus_dir
from comflp.hidden import MeasureSettings, collect
from comflp.model import load_model
from comflp.search import exhaustive
from comflp.stages import coarse, comflp_search, fine
from comflp.verify import FineSearch, verify

from conftest import make_corpus, save_plain, tiny_model


def test_comflp_search_equals_the_engines_by_hand(tmp_path: Path) -> None:
    corpus = read_corpus_dir(make_corpus(tmp_path / "corpus", n=8))
    loaded = load_model(save_plain(tiny_model("wav2vec2", seed=2), tmp_path / "m", tmp_path / "proc"))
    settings = MeasureSettings(measures=("dc", "cosine"), batch_size=4, iter_num=2)
    engine = FineSearch(loaded, corpus, batch_size=4, progress=False)
    run = comflp_search(loaded, corpus, engine, 3, settings=settings, measure_name="cosine", top_n=4, racing=False)

    by_hand, _ = collect(loaded.model, loaded.feature_extractor, corpus, settings, progress=False)
    np.testing.assert_array_equal(run.measured.matrices["cosine"], by_hand["cosine"].numpy())
    top = exhaustive(by_hand["cosine"].numpy(), 3, 4).candidates  # exact search == exhaustive enumeration
    assert [c.pruned for c in run.coarse.candidates] == [c.pruned for c in top]
    report = verify(FineSearch(loaded, corpus, batch_size=4, progress=False), top)
    assert [c.cer for c in run.fine.report.candidates] == [c.cer for c in report.candidates]
    assert run.best.pruned == report.best.pruned
    assert run.seconds == run.measured.seconds + run.coarse.seconds + run.fine.seconds > 0
    # racing through the same stage: survivors keep full-subset CERs
    raced = fine(engine, top, racing=True, seed=1).report
    for r, f, n in zip(raced.candidates, report.candidates, raced.decoded):
        assert n < len(corpus) or r.cer == f.cer


def test_coarse_modes_agree_on_the_best_block_strategy() -> None:
    rng = np.random.default_rng(0)
    m = rng.uniform(0.5, 1.0, (9, 9))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    assert coarse(m, 4, mode="exact", top_n=5).candidates == coarse(m, 4, mode="exhaustive", top_n=5).candidates
