"""A pruned model runs in ``transformers.pipeline("automatic-speech-recognition")`` and transcribes there what
``comflp test`` transcribes. (Whisper, with word timestamps after decoder pruning, on the real tiny.en:
tests/test_real_whisper.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import pipeline

from comflp.data import load_audio, read_corpus_dir
from comflp.model import load_model, prune
from comflp.stages import evaluate, prune as prune_stage

from conftest import FAMILIES, make_corpus, save_plain, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pipeline_transcribes_a_pruned_ctc_model_as_comflp_test(family: str, tmp_path: Path) -> None:
    source = load_model(save_plain(tiny_model(family, seed=6), tmp_path / "src", tmp_path / "proc"),
                        need_tokenizer=True)
    out = prune_stage(source, [2, 5], tmp_path / "pruned").path
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=4))
    tested = evaluate(load_model(out, need_tokenizer=True), utts, tmp_path / "test", data="corpus", batch_size=4)
    asr = pipeline("automatic-speech-recognition", model=str(out))
    sr = asr.feature_extractor.sampling_rate
    texts = [asr({"raw": load_audio(u.path, sr), "sampling_rate": sr})["text"] for u in utts]
    assert texts == tested.scored.transcription.hypotheses


def test_pruning_every_alignment_head_away_warns_and_drops_the_field(caplog) -> None:
    from test_whisper import tiny_whisper

    model = tiny_whisper()
    model.generation_config.alignment_heads = [[1, 0], [2, 1]]  # in decoder layers 2 and 3 (1-based)
    with caplog.at_level(logging.WARNING):
        kept_some = prune(model, [], decoder_pruned=[2, 4])
    assert kept_some.generation_config.alignment_heads == [[1, 1]] and "alignment head" not in caplog.text
    with caplog.at_level(logging.WARNING):
        none_left = prune(model, [], decoder_pruned=[2, 3])
    assert not hasattr(none_left.generation_config, "alignment_heads")
    assert "word timestamps (return_timestamps='word') will be unavailable" in caplog.text
