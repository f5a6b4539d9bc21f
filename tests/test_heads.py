"""The head kinds: the family table names one per family, and each answers for its kind of model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comflp.data import collate, read_corpus_dir
from comflp.errors import ComflpError
from comflp.heads import HEADS, CtcHead, Seq2SeqHead, check_prompt, head_of
from comflp.model import FAMILIES, frame_mask, load_model
from comflp.model.families import DEFAULT_FAMILY
from comflp.prompt import Prompt

from conftest import make_corpus, save_plain, tiny_model


def test_every_family_names_a_head_kind_with_its_stacks() -> None:
    from comflp.heads import HeadKind

    with pytest.raises(TypeError, match="abstract"):  # a kind must define what the base leaves abstract
        HeadKind()
    for name, family in {**FAMILIES, "(default)": DEFAULT_FAMILY}.items():
        assert family.kind in HEADS, name
        assert tuple(family.stacks) == HEADS[family.kind].stacks, name


def test_a_ctc_model_refuses_a_prompt_in_one_line(tmp_path: Path) -> None:
    loaded = load_model(save_plain(tiny_model("wav2vec2", seed=1), tmp_path / "m", tmp_path / "p"))
    assert isinstance(head_of(loaded.model), CtcHead)
    assert check_prompt(loaded.model, None) == Prompt()
    with pytest.raises(ComflpError, match="--language/--task/--instruction set the prompt of an encoder-decoder model"):
        check_prompt(loaded.model, Prompt(language="en"))


def test_ctc_labels_and_distillation_positions(tmp_path: Path) -> None:
    """CTC trains on the transcript's ids (padded with -100) and distils over the real frames of each utterance."""
    loaded = load_model(save_plain(tiny_model("wav2vec2", seed=1), tmp_path / "m", tmp_path / "p"),
                        need_tokenizer=True)
    head = head_of(loaded.model)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=3))
    batch = collate(utts, loaded.feature_extractor)
    labels = head.labels(loaded.model, loaded.tokenizer, batch.texts)
    for row, text in zip(labels.tolist(), batch.texts):
        ids = [i for i in row if i != -100]
        assert loaded.tokenizer.decode(ids).replace(" ", "") == text.replace(" ", "")
    with torch.no_grad():
        logits = head.teacher_logits(loaded.model, batch, labels, pad_audio=False)
    mask = head.distillation_mask(loaded.model, batch, labels, logits)
    assert torch.equal(mask, frame_mask(loaded.model, batch.attention_mask, logits.shape[1]))
    assert head.generation_limit(loaded.model, loaded.tokenizer, batch.texts) is None
    assert head.normalizer(loaded.model, loaded.tokenizer) is None


def test_seq2seq_distils_over_the_label_positions(tmp_path: Path) -> None:
    from test_whisper import _whisper_dir

    loaded = load_model(_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    head = head_of(loaded.model)
    assert isinstance(head, Seq2SeqHead) and head.stacks == ("encoder", "decoder")
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=3))
    batch = collate(utts, loaded.feature_extractor)
    labels = head.labels(loaded.model, loaded.tokenizer, batch.texts, prompt=Prompt())
    with torch.no_grad():
        logits = head.teacher_logits(loaded.model, batch, labels, pad_audio=False)
    assert logits.shape[:2] == labels.shape  # one prediction per label: teacher forcing
    assert torch.equal(head.distillation_mask(loaded.model, batch, labels, logits), labels != -100)
    assert head.shared_prefix(loaded.model, loaded.tokenizer, batch, "encoder") == {}
    assert set(head.shared_prefix(loaded.model, loaded.tokenizer, batch, "decoder")) == {"encoder_outputs"}
