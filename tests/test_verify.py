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


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2-stable", "wavlm", "data2vec-audio", "unispeech-sat", "wav2vec2-conformer",
                                    "sew", "sew-d", "wav2vec2-bert", "parakeet_ctc", "lasr_ctc"])
def test_shared_prefix_equals_separately_built_models(family: str, corpus: Path, tmp_path: Path) -> None:
    model_dir = save_plain(tiny_model(family, seed=3), tmp_path / "m", tmp_path / "proc")
    loaded = load_model(model_dir)
    utts = read_corpus_dir(corpus)
    fine = FineSearch(loaded, utts, batch_size=3, progress=False)
    hyps = fine.transcribe(SETS)
    shared = fine.error_rates(hyps)
    naive, naive_hyps = evaluate_separately(loaded, utts, SETS, batch_size=3)
    assert hyps == naive_hyps
    assert len({tuple(h) for h in naive_hyps}) > 1  # the sets really decode differently
    assert [r.rate for r in shared] == [r.rate for r in naive]
    assert fine.stats.layer_applications < fine.stats.naive_layer_applications
    # trie nodes: distinct prefixes of the kept sequences, per batch (3 batches)
    kept = [tuple(i for i in range(6) if i + 1 not in s) for s in SETS]
    nodes = {k[:j] for k in kept for j in range(1, len(k) + 1)}
    assert fine.stats.layer_applications == 3 * len(nodes)


@pytest.mark.parametrize("family", ["wav2vec2", "data2vec-audio", "sew-d"])
def test_front_end_outputs_are_kept_across_evaluations_within_the_budget(family: str, corpus: Path,
                                                                          tmp_path: Path) -> None:
    from comflp.model import front_end

    loaded = load_model(save_plain(tiny_model(family, seed=5), tmp_path / "m", tmp_path / "proc"))
    calls = [0]
    front_end(loaded.model).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    utts = read_corpus_dir(corpus)
    kept = FineSearch(loaded, utts, batch_size=3, progress=False)  # 3 batches
    first = kept.transcribe(SETS[:3])
    assert calls[0] == 3  # once per batch for three layer sets
    again = kept.transcribe(SETS[3:])
    assert calls[0] == 3  # the second evaluation reuses them
    none_kept = FineSearch(loaded, utts, batch_size=3, progress=False, front_end_cache_gb=0)
    assert none_kept.transcribe(SETS[:3]) + none_kept.transcribe(SETS[3:]) == first + again
    assert calls[0] == 3 + 6


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


def test_worse_than_leader_bootstrap_bounds() -> None:
    import numpy as np

    from comflp.verify import worse_than_leader

    rng = np.random.default_rng(0)
    tokens = np.full(40, 10)
    leader = rng.integers(0, 3, 40)
    # worse on every utterance: every resample agrees, even at a very high confidence
    assert worse_than_leader(leader + 1, leader, tokens, confidence=0.999, resamples=500, rng=rng)
    # the same errors are never worse; a swap of errors between utterances is a tie, not worse
    assert not worse_than_leader(leader, leader, tokens, confidence=0.5, resamples=500, rng=rng)
    swapped = leader[::-1].copy()
    assert not worse_than_leader(swapped, leader, tokens, confidence=0.99, resamples=500, rng=rng)
    # one extra error in 400 tokens is within the noise at 99%
    one_more = leader.copy()
    one_more[0] += 1
    assert not worse_than_leader(one_more, leader, tokens, confidence=0.99, resamples=500, rng=rng)


def test_race_picks_what_full_evaluation_picks_on_the_demo_model() -> None:
    from comflp.demo.corpus import read_corpus
    from comflp.paths import DEMO_MODEL_DIR, demo_split
    from comflp.verify import race

    loaded = load_model(DEMO_MODEL_DIR)
    utts = read_corpus(demo_split("dev"))[:96]
    sets = [[2, 4, 6, 8, 10, 12], [7, 8, 9, 10, 11, 12], [4, 5, 6, 7, 8, 9], [1, 3, 5, 7, 9, 11], [1, 2, 3, 4, 5, 6],
            [3, 4, 6, 8, 10, 11], [3, 5, 6, 8, 9, 11], [2, 4, 6, 8, 10, 11], [3, 4, 6, 8, 10, 12], [4, 6, 8, 9, 10, 11]]
    cands = [Candidate(s, float(-i)) for i, s in enumerate(sets)]
    full = verify(FineSearch(loaded, utts, batch_size=16, progress=False), cands)
    fine = FineSearch(loaded, utts, batch_size=16, progress=False)
    raced = race(fine, cands, first_batches=1, seed=0)
    assert raced.best.pruned == full.best.pruned
    assert sum(raced.decoded) < 0.7 * len(utts) * len(sets)  # it really saved decoding
    assert fine.stats.utterance_decodes == sum(raced.decoded)
    for f, r, n in zip(full.candidates, raced.candidates, raced.decoded):
        if n == len(utts):  # survivors are scored on the whole subset, as full evaluation scores them
            assert r.cer == f.cer
    assert raced.decoded[4] < len(utts)  # pruning the first six layers is hopeless: dropped early
