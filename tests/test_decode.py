"""Decoding: results do not depend on how utterances are batched (group-norm encoders included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comflp.data import collate
from comflp.decode import compare_speed, transcribe
from comflp.model import forward, frame_mask, load_model, prune
from comflp.demo.corpus import read_corpus
from comflp.paths import DEMO_MODEL_DIR, demo_split
from comflp.verify import FineSearch, evaluate_separately

from conftest import FAMILIES, make_corpus, save_plain, tiny_model


def test_demo_test_split_is_batch_invariant() -> None:
    """The shipped demo model has group norm in its conv encoder, like wav2vec2-base."""
    loaded = load_model(DEMO_MODEL_DIR, need_tokenizer=True)
    assert loaded.model.config.feat_extract_norm == "group"
    utts = read_corpus(demo_split("test"))
    assert len(utts) == 200
    utts = utts[:80]  # five batches of 16, of mixed lengths
    one = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=1)
    sixteen = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=16)
    assert one.hypotheses == sixteen.hypotheses
    # the paper's batching (padded audio through the group-norm encoder) is not batch-invariant
    padded = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=16,
                        pad_audio=True)
    assert padded.hypotheses != one.hypotheses


def test_fine_search_does_not_depend_on_verify_batch_size() -> None:
    loaded = load_model(DEMO_MODEL_DIR, need_tokenizer=True)
    utts = read_corpus(demo_split("dev"))[:24]
    sets = [[1, 3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12], [7, 8, 9, 10, 11, 12], [12]]
    rates = {bs: [r.rate for r in FineSearch(loaded, utts, batch_size=bs, progress=False).evaluate(sets)]
             for bs in (1, 5, 24)}
    assert rates[1] == rates[5] == rates[24]
    alone, _ = evaluate_separately(loaded, utts, sets, batch_size=1)
    assert [r.rate for r in alone] == rates[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_decodes_the_same_at_any_batch_size(family: str, tmp_path: Path) -> None:
    model_dir = save_plain(tiny_model(family, seed=5, feat_extract_norm="group"), tmp_path / "m", tmp_path / "p")
    loaded = load_model(model_dir, need_tokenizer=True)
    corpus = make_corpus(tmp_path / "corpus", n=9)
    utts = read_corpus(corpus)
    with torch.no_grad():
        alone = []
        for b in (collate([u], loaded.feature_extractor) for u in utts):
            logits = forward(loaded.model, b.inputs, b.attention_mask).logits[0]
            # the real frames (Parakeet's last log-mel frame covers a partial window and is padding to the model)
            alone.append(logits[: int(frame_mask(loaded.model, b.attention_mask, logits.shape[0]).sum())])
        batch = collate(utts, loaded.feature_extractor)
        together = forward(loaded.model, batch.inputs, batch.attention_mask).logits
    assert len({a.shape[0] for a in alone}) > 1  # really padded
    for i, logits in enumerate(alone):
        torch.testing.assert_close(together[i, : logits.shape[0]], logits, rtol=1e-4, atol=1e-5)


def test_compare_speed_times_both_models_on_the_same_batches() -> None:
    loaded = load_model(DEMO_MODEL_DIR, need_tokenizer=True)
    utts = read_corpus(demo_split("test"))[:8]
    small = prune(loaded.model, [1, 3, 5, 7, 9, 11])
    cmp = compare_speed(loaded.model, small, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=4,
                        repeats=1)
    assert cmp.audio_seconds > 0 and cmp.first_seconds > 0 and cmp.second_seconds > 0
    assert cmp.speedup == pytest.approx(cmp.first_seconds / cmp.second_seconds)
