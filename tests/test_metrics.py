from __future__ import annotations

import jiwer
import pytest
import torch

from comflp.metrics import error_rate, greedy_decode, guess_unit, normalize, real_time_factor

from conftest import tiny_processor


def test_cer_counts_characters_and_ignores_spaces() -> None:
    # ref 6 chars; hyp: one substitution (界->届), one deletion (们), one insertion (啊)
    er = error_rate(["你好 世界", "我们"], ["你好世届啊", "我"], unit="char")
    assert (er.substitutions, er.deletions, er.insertions, er.num_ref_tokens) == (1, 1, 1, 6)
    assert er.rate == pytest.approx(3 / 6)


def test_cer_equals_jiwer_cer_on_unspaced_text() -> None:
    refs, hyps = ["今天天气很好", "我们是人"], ["今天天汽很", "我们是的人"]
    assert error_rate(refs, hyps, unit="char").rate == pytest.approx(jiwer.cer(refs, hyps))


def test_wer_for_words() -> None:
    assert error_rate(["the cat sat"], ["the cat sit down"], unit="word").rate == pytest.approx(2 / 3)
    assert normalize("  a  b ", "word") == "a b"


def test_greedy_decode_merges_repeats_and_drops_blanks(tmp_path) -> None:
    _, tok = tiny_processor(tmp_path)
    ids = [3, 3, 0, 3, 4, 4, 0, 0, 5, 9, 9]  # 你你_你好好__世是是 ; the last two frames are padding
    logits = torch.full((1, len(ids), 12), -10.0)
    logits[0, torch.arange(len(ids)), torch.tensor(ids)] = 10.0
    assert greedy_decode(logits, tok, torch.tensor([9])) == ["你你好世"]
    assert greedy_decode(logits, tok) == ["你你好世是"]


def test_unit_guess_and_rtf() -> None:
    assert guess_unit(["你好 世界"]) == "char" and guess_unit(["hello world"]) == "word"
    assert real_time_factor(1.0, 4.0) == 0.25


def test_utterance_errors_sum_to_the_set_error_rate() -> None:
    from comflp.metrics import error_rate, utterance_errors

    refs = ["你好世界", "今天天气", "a b c d", "x"]
    hyps = ["你世界界好", "", "a c d e f", "x"]
    for unit in ("char", "word"):
        errors, tokens = utterance_errors(refs, hyps, unit=unit)
        assert errors.sum() / tokens.sum() == error_rate(refs, hyps, unit=unit).rate
        for r, h, e, t in zip(refs, hyps, errors, tokens):  # each utterance alone is its own set
            single = error_rate([r], [h], unit=unit)
            assert (e, t) == (single.substitutions + single.deletions + single.insertions, single.num_ref_tokens)
