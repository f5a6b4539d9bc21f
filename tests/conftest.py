"""Shared fixtures: tiny random CTC models of each family, a processor, and tiny corpora."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Data2VecAudioConfig, Data2VecAudioForCTC, HubertConfig, HubertForCTC, LasrCTCConfig,
                          LasrFeatureExtractor, LasrForCTC, LasrTokenizer, ParakeetCTCConfig,
                          ParakeetFeatureExtractor, ParakeetForCTC, ParakeetTokenizer, SEWConfig, SEWDConfig,
                          SeamlessM4TFeatureExtractor, SEWDForCTC, SEWForCTC, UniSpeechConfig, UniSpeechForCTC,
                          UniSpeechSatConfig, UniSpeechSatForCTC, Wav2Vec2BertConfig, Wav2Vec2BertForCTC,
                          Wav2Vec2Config, Wav2Vec2ConformerConfig, Wav2Vec2ConformerForCTC, Wav2Vec2CTCTokenizer,
                          Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, WavLMConfig, WavLMForCTC)

# dcor (the reference for DC) compiles its numba functions on its first import and caches them beside its own
# sources: two pytest-xdist workers compiling at once in a fresh environment (CI's) wrote an inconsistent cache,
# after which every import aborted ("LLVM ERROR: Symbol not found") and no test ran. One worker at a time
# imports it here; the others then load what it cached.
with FileLock(Path(tempfile.gettempdir()) / "comflp-tests-dcor-import.lock"):
    import dcor  # noqa: F401

TINY_VOCAB = ["<pad>", "<unk>", "|", "你", "好", "世", "界", "我", "们", "是", "的", "人"]

_TINY = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=48,
             conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=2, vocab_size=len(TINY_VOCAB), pad_token_id=0,
             hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
             final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)

# Parakeet's SentencePiece-style vocabulary: "▁" marks a word start, the CTC blank is the last id
PARAKEET_VOCAB = ["<unk>", "▁"] + TINY_VOCAB[3:] + ["<pad>"]
_TINY_CONFORMER = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=48)

FAMILIES = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2ForCTC, {"do_stable_layer_norm": False}),
    "wav2vec2-stable": (Wav2Vec2Config, Wav2Vec2ForCTC, {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}),
    "hubert": (HubertConfig, HubertForCTC, {}),
    "wavlm": (WavLMConfig, WavLMForCTC, {"num_buckets": 16, "max_bucket_distance": 40}),
    "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioForCTC, {}),
    "unispeech": (UniSpeechConfig, UniSpeechForCTC, {}),
    "unispeech-sat": (UniSpeechSatConfig, UniSpeechSatForCTC, {}),
    "wav2vec2-conformer": (Wav2Vec2ConformerConfig, Wav2Vec2ConformerForCTC,
                           {"position_embeddings_type": "relative", "conv_depthwise_kernel_size": 3}),
    "sew": (SEWConfig, SEWForCTC, {"squeeze_factor": 2}),
    "sew-d": (SEWDConfig, SEWDForCTC, {"squeeze_factor": 2, "position_buckets": 16, "max_position_embeddings": 64}),
    "wav2vec2-bert": (Wav2Vec2BertConfig, Wav2Vec2BertForCTC, None),  # input_features: stacked log-mel frames
    "parakeet_ctc": (ParakeetCTCConfig, ParakeetForCTC, None),  # input_features: log-mel frames, 8x subsampling
    "lasr_ctc": (LasrCTCConfig, LasrForCTC, None),  # input_features: 128 log-mel bins, 4x subsampling
}


def _feature_input_config(family: str, overrides: dict):
    if family == "wav2vec2-bert":
        return Wav2Vec2BertConfig(**{**_TINY_CONFORMER, "vocab_size": len(TINY_VOCAB), "pad_token_id": 0,
                                     "feature_projection_input_dim": 160, "conv_depthwise_kernel_size": 5,
                                     "output_hidden_size": 32, "left_max_position_embeddings": 16,
                                     "right_max_position_embeddings": 4, "hidden_dropout": 0.0,
                                     "attention_dropout": 0.0, "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
                                     "final_dropout": 0.0, "layerdrop": 0.0, "mask_time_prob": 0.0, **overrides})
    encoder = {**_TINY_CONFORMER, "subsampling_conv_channels": 8, "conv_kernel_size": 9, "dropout": 0.0,
               "dropout_positions": 0.0, "layerdrop": 0.0, "activation_dropout": 0.0, "attention_dropout": 0.0,
               **overrides}
    if family == "lasr_ctc":  # google/medasr's shape, tiny; its blank is the pad token, id 0
        return LasrCTCConfig(encoder_config={**encoder, "num_key_value_heads": 2}, vocab_size=len(LASR_VOCAB),
                             pad_token_id=0)
    return ParakeetCTCConfig(encoder_config=encoder, vocab_size=len(PARAKEET_VOCAB),
                             pad_token_id=len(PARAKEET_VOCAB) - 1)


def tiny_model(family: str = "wav2vec2", seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = (_feature_input_config(family, overrides) if extra is None
              else config_cls(**{**_TINY, **extra, **overrides}))
    return model_cls(config).eval()


def tiny_inputs(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random unpadded batch of 2 in the family's input kind: 4,000 samples, or 50 feature frames."""
    g = torch.Generator().manual_seed(seed)
    kind = model.main_input_name
    if kind == "input_values":
        return {kind: torch.randn(2, 4000, generator=g)}
    width = {"wav2vec2-bert": 160, "lasr_ctc": 128}.get(model.config.model_type, 80)
    return {kind: torch.randn(2, 50, width, generator=g)}


# LASR's SentencePiece vocabulary (T5-style: pad = the CTC blank, then </s> and <unk>), "▁" marks a word start
LASR_VOCAB = ["<pad>", "</s>", "<unk>", "▁"] + TINY_VOCAB[3:]


def lasr_tokenizer() -> LasrTokenizer:
    return LasrTokenizer(vocab=[(t, 0.0) for t in LASR_VOCAB], extra_ids=0)


def parakeet_tokenizer() -> ParakeetTokenizer:
    """A SentencePiece-style character vocabulary (BPE without merges, metaspace word marks), blank last."""
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(PARAKEET_VOCAB)}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return ParakeetTokenizer(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def processor_for(model, tmp: Path):
    """The feature extractor and tokenizer of ``model``'s family, as its published checkpoints ship them."""
    fe, tok = tiny_processor(tmp)
    if model.config.model_type == "parakeet_ctc":
        return ParakeetFeatureExtractor(), parakeet_tokenizer()
    if model.config.model_type == "lasr_ctc":
        return LasrFeatureExtractor(), lasr_tokenizer()
    if model.config.model_type == "wav2vec2-bert":
        return SeamlessM4TFeatureExtractor(), tok
    return fe, tok


def tiny_processor(tmp: Path):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TINY_VOCAB)}, ensure_ascii=False))
    tok = Wav2Vec2CTCTokenizer(str(tmp / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                               word_delimiter_token="|", bos_token=None, eos_token=None)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    return fe, tok


def save_plain(model, out: Path, tmp: Path) -> Path:
    """Save like a user of plain transformers would: save_pretrained + processor files."""
    fe, tok = processor_for(model, tmp)
    model.save_pretrained(out)
    fe.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return save_plain(tiny_model("wav2vec2"), tmp_path / "tiny", tmp_path / "proc")


def write_wav(path: Path, seconds: float, sr: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.01 * rng.standard_normal(n)
    if channels > 1:
        wave = np.stack([wave] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, sr, subtype="PCM_16")
    return path


def make_corpus(root: Path, n: int = 6, texts: list[str] | None = None, seconds: float | None = None) -> Path:
    """A Kaldi dir of ``n`` short tone files with relative paths (0.5 s, 0.6 s, ..., or all ``seconds`` long)."""
    root.mkdir(parents=True, exist_ok=True)
    texts = texts or ["你好世界", "我们是人", "你好", "世界的人", "我是你", "好的"] * (n // 6 + 1)
    scp, txt = [], []
    for i in range(n):
        utt = f"U{i:03d}"
        write_wav(root / "wav" / f"{utt}.wav", seconds or 0.5 + 0.1 * i, seed=i)
        scp.append(f"{utt} wav/{utt}.wav\n")
        txt.append(f"{utt} {texts[i]}\n")
    (root / "wav.scp").write_text("".join(scp), encoding="utf-8")
    (root / "text").write_text("".join(txt), encoding="utf-8")
    return root


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tmp dir, a tiny stable-layer-norm wav2vec2 saved with its processor, an 8-utterance corpus): what the
    unhappy-path tests feed to the commands."""
    tmp = tmp_path_factory.mktemp("world")
    model = save_plain(tiny_model("wav2vec2-stable", seed=2), tmp / "model", tmp / "proc")
    corpus = make_corpus(tmp / "corpus", n=8)
    return tmp, model, corpus


def _called(call, cwd: Path | None, args: list[str]):
    """Run ``call()`` as a command line would, in this process (a subprocess per run would spend seconds
    importing torch): in ``cwd``, stdout and stderr captured, the exit status from its ``SystemExit``; the
    working dir, torch's thread count (``--threads`` sets it) and ``sys.argv`` restored afterwards."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    out, err = io.StringIO(), io.StringIO()
    threads, here, argv = torch.get_num_threads(), os.getcwd(), sys.argv
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            call()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_comflp(*args: str, cwd: Path | None = None):
    """``comflp <args>`` through the dispatcher the console script calls, in this process."""
    from comflp.cli import main

    return run_main(main, *args, cwd=cwd)


def run_script(script: Path, *args: str, cwd: Path | None = None):
    """``python <script> <args>`` (a paper script) in this process: the script run as ``__main__``."""
    import runpy
    import sys

    def call() -> None:
        sys.argv = [str(script), *args]
        runpy.run_path(str(script), run_name="__main__")

    return _called(call, cwd, [str(script), *args])


def run_main(main, *args: str, cwd: Path | None = None):
    """A command's ``main(argv)`` called in this process, as its script would run it."""
    return _called(lambda: main(list(args)), cwd, list(args))


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``), the controller generates the embedded demo corpus before
    the workers start, so that two workers never race to write it (the second would stop at its lock). A
    sequential run generates it on first use, as a user's command does."""
    if hasattr(config, "workerinput"):
        # two workers on two cores: one torch thread each (and in the processes they start), as two threads
        # each would oversubscribe the cores and spin
        import os

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        return
    if not getattr(config.option, "numprocesses", None):
        return
    from comflp.demo.corpus import ensure_demo_corpus
    from comflp.paths import demo_split

    for split in ("train", "dev", "test"):
        ensure_demo_corpus(demo_split(split))
