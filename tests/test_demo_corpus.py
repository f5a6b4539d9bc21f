from __future__ import annotations

import hashlib
import json
from pathlib import Path

import soundfile as sf

from comflp.data import read_corpus_dir
from comflp.demo.corpus import COMMON_CHARS, CorpusConfig, distinct_pronunciations, generate
from comflp.demo.tts import Espeak

TINY = CorpusConfig(seed=7, num_train=12, num_dev=4, num_test=4, speakers_train=3, speakers_dev=1, speakers_test=1)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = _digest(generate(tmp_path / "a", TINY, progress=False))
    b = _digest(generate(tmp_path / "b", TINY, progress=False))
    assert a == b and len(a) == 12 + 4 + 4 + 4 * 3 + 1 + 1  # + the ownership mark
    c = _digest(generate(tmp_path / "c", CorpusConfig(**{**TINY.__dict__, "seed": 8}), progress=False))
    assert c != a


def test_writes_valid_kaldi_dirs(tmp_path: Path) -> None:
    root = generate(tmp_path / "demo", TINY, progress=False)
    speakers = {}
    for split, n in (("train", 12), ("dev", 4), ("test", 4)):
        utts = read_corpus_dir(root / split)
        assert len(utts) == n
        assert all(4 <= len(u.text) <= 10 for u in utts)
        assert all(u.speaker and u.utt_id.startswith("SYN000" + u.speaker) for u in utts)
        info = sf.info(str(utts[0].path))
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        spk2utt = dict(line.split(" ", 1) for line in (root / split / "spk2utt").read_text().splitlines())
        assert sum(len(v.split()) for v in spk2utt.values()) == n
        speakers[split] = {u.speaker for u in utts}
    assert not speakers["train"] & speakers["dev"] and not speakers["dev"] & speakers["test"]


def test_homophone_filter_keeps_one_character_per_pronunciation() -> None:
    espeak = Espeak.get()
    kept = distinct_pronunciations("是事市十的我", espeak)
    # 是, 事 and 市 are all "shi4" for espeak; 十 is shi2
    assert kept[0] == "是" and "事" not in kept and "市" not in kept and "十" in kept
    full = distinct_pronunciations(COMMON_CHARS, espeak)
    sounds = [espeak.phonemes(c) for c in full]
    assert len(set(sounds)) == len(sounds) and len(full) >= 300


def test_english_corpus_speaks_every_accent_in_every_split(tmp_path: Path) -> None:
    """The English corpus (for English checkpoints): sentences of the grammar, one accent per speaker in turn so
    that every split hears all of them, its own utterance ids, and the same seed gives the same bytes."""
    from comflp.demo import english

    n = len(english.ACCENTS)
    cfg = CorpusConfig.for_language("en", seed=3, num_train=n, num_dev=n, num_test=n, speakers_train=n)
    root = generate(tmp_path / "en", cfg, progress=False)
    vocabulary = set(english.vocabulary())
    for split in ("train", "dev", "test"):
        utts = read_corpus_dir(root / split)
        assert len(utts) == n and all(u.utt_id.startswith("SYNEN0" + u.speaker) for u in utts)
        assert all(u.text[0].isupper() and u.text[-1] in ".?" for u in utts)
        assert all(w.strip(".?").lower() in vocabulary for u in utts for w in u.text.split())
    manifest = json.loads((root / "corpus.json").read_text())
    for split in ("train", "dev", "test"):
        assert sorted(v["name"] for v in manifest["speakers"][split].values()) == sorted(english.ACCENTS)
    assert manifest["config"]["language"] == "en"
    again = generate(tmp_path / "again", cfg, progress=False)
    assert _digest(again) == _digest(root)


def test_corpus_command_refuses_a_mandarin_only_flag_for_english(tmp_path: Path, capsys) -> None:
    import pytest

    from comflp.demo.corpus import main

    with pytest.raises(SystemExit) as exit_:
        main(["--language", "en", "--vocab_size", "50", "--output", str(tmp_path / "en")])
    assert exit_.value.code == 2 and "--vocab_size" in capsys.readouterr().err
    assert not (tmp_path / "en").exists()
