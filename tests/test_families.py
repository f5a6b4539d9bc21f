"""Every family through every command: a tiny random model goes measure -> search -> prune -> test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCTC

from comflp import analysis, cli, search_cli, testset_cli

from conftest import FAMILIES, make_corpus, save_plain, tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("families") / "corpus", n=6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_search_prune_test(family: str, corpus: Path, tmp_path: Path) -> None:
    model = save_plain(tiny_model(family, seed=7), tmp_path / "model", tmp_path / "proc")
    npz = tmp_path / "m.npz"
    analysis.main(["--model", str(model), "--data_dir", str(corpus), "--batch_size", "3", "--iter_num", "2",
                   "--measures", "cosine,dc", "--no_plot", "--quiet", "--dump_dir", str(tmp_path), "--output", str(npz)])
    strategy = tmp_path / "s.json"
    search_cli.main(["--model", str(model), "--measure_file", str(npz), "--num_layers", "6", "--num_clip_layers", "2",
                     "--search_mode", "exact", "--topk_num", "3", "--verify_data_dir", str(corpus),
                     "--test_num_batch", "2", "--verify_batch_size", "3", "--log_dir", str(tmp_path), "--quiet",
                     "--output", str(strategy)])
    pick = json.loads(strategy.read_text())["candidates"][0]
    pruned = tmp_path / "pruned"
    cli.prune_main(["--model", str(model), "--strategy", str(strategy), "--rank", "1", "--output", str(pruned)])
    reloaded, info = AutoModelForCTC.from_pretrained(pruned, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = testset_cli.main(["--model", str(pruned), "--data_dir", str(corpus), "--batch_size", "1",
                               "--output_dir", str(tmp_path / "test")])
    assert report["num_layers"] == 4 and 0 <= report["error_rate"]
    # the saved pruned model scores the CER the fine search measured by switching layers off (the subset is the
    # whole corpus); families whose layers see padding were fine-searched in batches of 3, so only nearly
    if family in ("wav2vec2-conformer", "sew", "sew-d"):
        assert abs(report["error_rate"] - pick["cer"]) < 0.5
    else:
        assert report["error_rate"] == pytest.approx(pick["cer"], abs=1e-12)
