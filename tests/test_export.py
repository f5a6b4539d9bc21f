"""comflp.export: ONNX for every CTC family and CTranslate2 for Whisper, each checked against PyTorch with
the runtimes themselves (ONNX Runtime, ctranslate2), which CI installs (the test extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comflp.errors import ComflpError
from comflp.export import ONNX_FILE, ONNX_TOLERANCE, export, onnx_logits, onnx_session
from comflp.model import LoadedModel, forward, frame_mask, load_model

from conftest import FAMILIES, make_corpus, save_plain, tiny_model

pytest.importorskip("onnxruntime")  # the test extra installs it; a bare install skips only this module


def _loaded(family: str, tmp: Path) -> LoadedModel:
    model = tiny_model(family, seed=4)
    return load_model(save_plain(model, tmp / family, tmp / "proc"), need_tokenizer=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_export_gives_pytorch_logits_on_padded_batches(family: str, tmp_path: Path) -> None:
    """Every CTC family exports with dynamic batch and time axes: ONNX Runtime's logits on padded batches of
    another size and length than the tracer saw are PyTorch's within the tolerance over real frames, and the
    greedy transcripts are the same. Exact families match the batch-invariant forward; the others the paper's
    padded batching (and each utterance alone is exact for every family)."""
    from comflp.data import read_corpus_dir, iter_batches

    loaded = _loaded(family, tmp_path)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=5))  # batches of 4 and 1: padding, and alone
    out = export(loaded, tmp_path / "onnx", fmt="onnx", check_utts=utts, batch_size=4)
    assert out.check.same_transcripts == out.check.utterances == 5
    assert out.check.max_logit_difference <= ONNX_TOLERANCE * max(1.0, out.check.max_abs_logit)
    record = json.loads((tmp_path / "onnx" / "comflp_export.json").read_text())
    assert record["exact_batching"] == out.exact_batching and record["format"] == "onnx"
    # independently of the export's own check: a batch of 3 and one utterance alone
    session = onnx_session(tmp_path / "onnx" / ONNX_FILE)
    kind = loaded.model.main_input_name
    for batch in iter_batches(utts[:3], loaded.feature_extractor, batch_size=3):
        got = onnx_logits(session, batch, kind)
        with torch.inference_mode():
            want = forward(loaded.model, batch.inputs, batch.attention_mask, pad_audio=not out.exact_batching).logits
        mask = frame_mask(loaded.model, batch.attention_mask, want.shape[1])[..., None]
        assert float(((got - want).abs() * mask).max()) <= ONNX_TOLERANCE
    alone = next(iter_batches(utts[:1], loaded.feature_extractor, batch_size=1))
    with torch.inference_mode():
        want = forward(loaded.model, alone.inputs, alone.attention_mask).logits
    np.testing.assert_allclose(onnx_logits(session, alone, kind), want, atol=ONNX_TOLERANCE)


def test_masked_group_norm_is_in_the_graph(tmp_path: Path) -> None:
    """wav2vec2-base's group-norm front end: in a padded batch, the short utterance's ONNX logits are those it
    gets alone (the graph masks the statistics), not the padded batching's, which differ."""
    from comflp.data import read_corpus_dir, iter_batches

    loaded = _loaded("wav2vec2", tmp_path)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=6))
    out = export(loaded, tmp_path / "onnx", fmt="onnx")
    assert out.exact_batching and out.check is None
    session = onnx_session(tmp_path / "onnx" / ONNX_FILE)
    pair = [utts[0], utts[5]]  # 0.5 s and 1.0 s
    batch = next(iter_batches(pair, loaded.feature_extractor, batch_size=2))
    short = batch.utt_ids.index(utts[0].utt_id)
    alone = next(iter_batches(pair[:1], loaded.feature_extractor, batch_size=1))
    got = onnx_logits(session, batch, "input_values")[short]
    want = onnx_logits(session, alone, "input_values")[0]
    np.testing.assert_allclose(got[: want.shape[0]], want, atol=ONNX_TOLERANCE)
    with torch.inference_mode():
        paper = forward(loaded.model, batch.inputs, batch.attention_mask, pad_audio=True).logits[short]
    assert float((paper[: want.shape[0]] - want).abs().max()) > 10 * ONNX_TOLERANCE


def test_int8_reports_its_error_rate_change_and_the_cli_refuses_what_does_not_apply(tmp_path: Path, capsys) -> None:
    from comflp.cli.export import main

    model_dir = save_plain(tiny_model("wav2vec2-stable", seed=1), tmp_path / "m", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=6)
    main(["--model", str(model_dir), "--output", str(tmp_path / "int8"), "--quantization", "int8",
          "--check_data_dir", str(corpus), "--check_utts", "6", "--batch_size", "2"])
    record = json.loads((tmp_path / "int8" / "comflp_export.json").read_text())
    assert record["quantization"] == "int8" and record["check"]["utterances"] == 6
    assert "CER" in capsys.readouterr().out
    for flags, culprit in ((["--format", "ct2"], "--format ct2"), (["--quantization", "float16"], "float16")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model_dir), "--output", str(tmp_path / "no"), *flags])
        assert exit_info.value.code == 2 and culprit in capsys.readouterr().err
        assert not (tmp_path / "no").exists()


def test_a_missing_runtime_is_named_with_the_extra(tmp_path: Path, monkeypatch) -> None:
    loaded = _loaded("hubert", tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when it is not installed
    with pytest.raises(ComflpError, match=r"comflp\[export\]"):
        export(loaded, tmp_path / "x", fmt="onnx")
    assert not (tmp_path / "x").exists()


def test_whisper_exports_to_ctranslate2_with_the_same_greedy_transcripts(tmp_path: Path) -> None:
    """A pruned tiny multilingual Whisper (both stacks) converted by CTranslate2's own converter decodes the
    check utterances to PyTorch's greedy transcripts, from the same prompt (each utterance's language as the
    model detects it) and cap. A character vocabulary without Whisper's special tokens is refused: CTranslate2
    would read its characters as timestamps."""
    pytest.importorskip("ctranslate2")
    from test_whisper import _whisper_dir, multilingual_whisper_dir

    from comflp.data import read_corpus_dir
    from comflp.stages import prune

    characters = load_model(_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    with pytest.raises(ComflpError, match="no <|notimestamps|>"):
        export(characters, tmp_path / "chars", fmt="ct2")
    assert not (tmp_path / "chars").exists()
    source = load_model(multilingual_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    pruned = prune(source, [2], tmp_path / "pruned", decoder_layers=[1])
    loaded = load_model(pruned.path, allow_encoder_decoder=True, need_tokenizer=True)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=5))
    out = export(loaded, tmp_path / "ct2", fmt="ct2", check_utts=utts, batch_size=2)
    assert out.check.same_transcripts == 5 and out.check.max_logit_difference is None
    assert (tmp_path / "ct2" / "model.bin").is_file() and (tmp_path / "ct2" / "preprocessor_config.json").is_file()
    with pytest.raises(ComflpError, match="--format onnx does not export"):
        export(loaded, tmp_path / "onnx", fmt="onnx")
