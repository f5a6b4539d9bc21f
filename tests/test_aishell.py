from __future__ import annotations

from pathlib import Path

import pytest

from comflp.aishell import prepare
from comflp.data import read_corpus_dir
from comflp.errors import ComflpError

from conftest import write_wav


def _fake_tree(root: Path) -> Path:
    lines = []
    for split, speakers in {"train": ["S0002", "S0003"], "dev": ["S0724"], "test": ["S0764"]}.items():
        for spk in speakers:
            for n in range(1, 4):
                utt = f"BAC009{spk}W{n:04d}"
                write_wav(root / "wav" / split / spk / f"{utt}.wav", 0.2)
                if n != 3:  # the third utterance of every speaker has no transcript
                    lines.append(f"{utt} 而 对  楼市 成交\n")
    (root / "transcript").mkdir(parents=True)
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text("".join(lines), encoding="utf-8")
    return root


def test_prepare_builds_kaldi_dirs_and_drops_untranscribed(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path / "data_aishell")
    counts = prepare(root, tmp_path / "out")
    assert counts == {"train": 4, "dev": 2, "test": 2}
    train = tmp_path / "out" / "aishell_train"
    assert (train / "text").read_text(encoding="utf-8").splitlines()[0] == "BAC009S0002W0001 而 对 楼市 成交"
    assert (train / "utt2spk").read_text().splitlines()[2] == "BAC009S0003W0001 S0003"
    assert (train / "spk2utt").read_text().splitlines()[0] == "S0002 BAC009S0002W0001 BAC009S0002W0002"
    utts = read_corpus_dir(train)
    assert [u.utt_id for u in utts] == sorted(u.utt_id for u in utts)
    assert all(u.path.is_absolute() and u.path.is_file() for u in utts)


def test_prepare_errors(tmp_path: Path) -> None:
    with pytest.raises(ComflpError, match="AISHELL-1 root not found"):
        prepare(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ComflpError, match="transcript not found"):
        prepare(tmp_path / "empty", tmp_path / "out")
    root = _fake_tree(tmp_path / "d")
    for wav in (root / "wav" / "dev").glob("*/*.wav"):
        wav.unlink()
    (root / "wav" / "dev" / "S0724.tar.gz").write_bytes(b"")
    with pytest.raises(ComflpError, match="extract them first"):
        prepare(root, tmp_path / "out")
