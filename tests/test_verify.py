"""Fine search: shared-prefix evaluation equals separately built pruned models, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from comflp.data import read_corpus_dir
from comflp.errors import ComflpError
from comflp.model import load_model
from comflp.strategy import Candidate
from comflp.verify import FineSearch, evaluate_separately, greedy_layer_pruning, verify, verify_subset

from conftest import make_corpus, save_plain, tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("verify") / "corpus", n=7)


SETS = [[1, 2], [1, 3], [2, 5], [2, 6], [5, 6], [1, 2, 3], [4]]


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2-stable", "wavlm"])
def test_shared_prefix_equals_separately_built_models(family: str, corpus: Path, tmp_path: Path) -> None:
    model_dir = save_plain(tiny_model(family, seed=3), tmp_path / "m", tmp_path / "proc")
    loaded = load_model(model_dir)
    utts = read_corpus_dir(corpus)
    fine = FineSearch(loaded, utts, batch_size=3, progress=False)
    shared = fine.evaluate(SETS)
    naive, naive_hyps = evaluate_separately(loaded, utts, SETS, batch_size=3)
    assert fine.hypotheses == naive_hyps
    assert len({tuple(h) for h in naive_hyps}) > 1  # the sets really decode differently
    assert [r.rate for r in shared] == [r.rate for r in naive]
    assert fine.stats.layer_applications < fine.stats.naive_layer_applications
    # trie nodes: distinct prefixes of the kept sequences, per batch (3 batches)
    kept = [tuple(i for i in range(6) if i + 1 not in s) for s in SETS]
    nodes = {k[:j] for k in kept for j in range(1, len(k) + 1)}
    assert fine.stats.layer_applications == 3 * len(nodes)


def test_subset_is_first_n_in_wav_scp_order(corpus: Path) -> None:
    utts = read_corpus_dir(corpus)
    assert [u.utt_id for u in verify_subset(utts, 2, 2)] == ["U000", "U001", "U002", "U003"]
    with pytest.raises(ComflpError):
        verify_subset(utts, 0, 2)


def test_verify_report_and_glp(corpus: Path, tmp_path: Path) -> None:
    loaded = load_model(save_plain(tiny_model("wav2vec2", seed=4), tmp_path / "m", tmp_path / "proc"))
    fine = FineSearch(loaded, read_corpus_dir(corpus), batch_size=4, progress=False)
    cands = [Candidate([1, 2], 0.9), Candidate([3, 4], 0.8), Candidate([5, 6], 0.7)]
    report = verify(fine, cands)
    assert [c.pruned for c in report.candidates] == [[1, 2], [3, 4], [5, 6]]
    assert report.best.cer == min(c.cer for c in report.candidates)
    glp = greedy_layer_pruning(fine, 2, progress=False)
    assert len(glp.path) == 2 and len(glp.path[-1].pruned) == 2 and glp.evaluations == 6 + 5
    assert set(glp.path[0].pruned) <= set(glp.path[1].pruned)
