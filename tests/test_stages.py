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


def test_fine_tuning_config_is_the_flags_one_source_of_defaults() -> None:
    from dataclasses import asdict

    from comflp.cli.finetune import build_parser
    from comflp.finetune import FinetuneConfig

    from comflp.paths import demo_split

    flags, config = vars(build_parser().parse_args([])), asdict(FinetuneConfig())
    # the command picks the data dirs when it runs, by the model's language; the Python API's are the Mandarin ones
    assert (flags.pop("train_data_dir"), flags.pop("valid_data_dir")) == (None, None)
    assert (config.pop("train_data_dir"), config.pop("valid_data_dir")) == (demo_split("train"), demo_split("dev"))
    assert flags == config


def test_finetune_stage_takes_a_checked_config(tmp_path: Path) -> None:
    import pytest

    from comflp.errors import ComflpError
    from comflp.finetune import FinetuneConfig
    from comflp.stages import finetune

    with pytest.raises(TypeError, match="learning_rate"):  # a misspelt setting is no field of the config
        FinetuneConfig(output_dir=tmp_path / "ft", learning_rate=1e-4)
    with pytest.raises(ComflpError, match="max_grad_norm"):  # checked as the flags are, before anything runs
        finetune(FinetuneConfig(output_dir=tmp_path / "ft", max_grad_norm=0.0))
    assert not (tmp_path / "ft").exists()


def test_measured_matrix_saves_with_the_record_a_search_checks(tmp_path: Path) -> None:
    import pytest

    from comflp.artifacts import check_matrix_model, load_matrices, load_matrix
    from comflp.errors import ComflpError
    from comflp.stages import measure

    corpus_dir = make_corpus(tmp_path / "corpus", n=8)
    model_dir = save_plain(tiny_model("wav2vec2", seed=2), tmp_path / "m", tmp_path / "proc")
    loaded = load_model(model_dir)
    measured = measure(loaded, read_corpus_dir(corpus_dir), MeasureSettings(measures=("dc", "cosine"), batch_size=4,
                                                                            iter_num=2), data=str(corpus_dir),
                       progress=False)
    matrix, meta = load_matrix(measured.save(tmp_path / "dc.npy"))
    np.testing.assert_array_equal(matrix, measured.matrices["dc"])
    assert meta["num_layers"] == matrix.shape[0] - 1 and meta["stack"] == "encoder"
    assert meta["data_dir"] == str(corpus_dir) and meta["settings"]["measures"] == ["dc", "cosine"]
    check_matrix_model(meta, num_layers=matrix.shape[0] - 1, model=str(model_dir), where="dc.npy")
    with pytest.raises(ComflpError):
        check_matrix_model(meta, num_layers=matrix.shape[0] - 1, model=str(tmp_path / "other"), where="dc.npy")
    both, _ = load_matrices(measured.save(tmp_path / "all.npz"))
    assert set(both) == {"dc", "cosine"}
    with pytest.raises(ComflpError, match="--overwrite|overwrite"):
        measured.save(tmp_path / "dc.npy")  # an earlier output is replaced only when asked
    measured.save(tmp_path / "dc.npy", overwrite=True)


def test_test_stage_writes_the_report_and_hypotheses(tmp_path: Path) -> None:
    import json

    from comflp.stages import evaluate, score

    corpus = read_corpus_dir(make_corpus(tmp_path / "corpus", n=5))
    loaded = load_model(save_plain(tiny_model("wav2vec2", seed=2), tmp_path / "m", tmp_path / "proc"),
                        need_tokenizer=True)
    tested = evaluate(loaded, corpus, tmp_path / "t", data="five utterances", batch_size=2)
    report = json.loads(tested.report.read_text())
    assert report == tested.summary and report["data_dir"] == "five utterances"
    assert report["error_rate"] == score(loaded, corpus, batch_size=5).error_rate.rate  # batch size changes nothing
    assert len((tmp_path / "t" / "hyp.txt").read_text().splitlines()) == 5
