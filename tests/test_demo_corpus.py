from __future__ import annotations

import hashlib
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
