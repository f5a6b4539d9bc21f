from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from comflp.data import collate, length_sorted_batches, load_audio, read_corpus_dir
from comflp.model import frame_mask
from comflp.errors import ComflpError

from conftest import tiny_model, tiny_processor, write_wav


def test_reads_in_wav_scp_order_with_relative_paths(corpus: Path) -> None:
    utts = read_corpus_dir(corpus)
    assert [u.utt_id for u in utts] == [f"U{i:03d}" for i in range(6)]
    assert utts[0].text == "你好世界"
    assert utts[0].path == corpus / "wav" / "U000.wav"


def test_utt2spk_is_optional_and_read(corpus: Path) -> None:
    (corpus / "utt2spk").write_text("".join(f"U{i:03d} S{i % 2}\n" for i in range(6)))
    assert read_corpus_dir(corpus)[3].speaker == "S1"


def _error(path: Path, **kw) -> str:
    with pytest.raises(ComflpError) as err:
        read_corpus_dir(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_wav_names_utt_and_path(corpus: Path) -> None:
    (corpus / "wav" / "U002.wav").unlink()
    msg = _error(corpus)
    assert "U002" in msg and "U002.wav" in msg and "not found" in msg


def test_ids_only_in_text(corpus: Path) -> None:
    with open(corpus / "text", "a", encoding="utf-8") as f:
        f.write("X1 你\nX2 好\nX3 我\nX4 们\n")
    msg = _error(corpus)
    assert msg.startswith("4 id(s)") and "X1, X2, X3, ..." in msg and "text" in msg


def test_ids_only_in_wav_scp(corpus: Path) -> None:
    lines = (corpus / "text").read_text(encoding="utf-8").splitlines()
    (corpus / "text").write_text("\n".join(lines[:-2]) + "\n", encoding="utf-8")
    msg = _error(corpus)
    assert msg.startswith("2 id(s)") and "U004, U005" in msg and "wav.scp" in msg


def test_empty_transcript(corpus: Path) -> None:
    text = (corpus / "text").read_text(encoding="utf-8").replace("U001 我们是人", "U001 ")
    (corpus / "text").write_text(text, encoding="utf-8")
    msg = _error(corpus)
    assert "empty transcript" in msg and "U001" in msg


def test_pipe_command_is_refused(corpus: Path) -> None:
    (corpus / "wav.scp").write_text("U000 sox a.flac -t wav - |\n")
    msg = _error(corpus)
    assert "pipe" in msg and "U000" in msg


def test_missing_dir_and_wav_scp(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "no wav.scp" in _error(tmp_path / "empty")


def test_corrupt_wav_names_the_file(corpus: Path) -> None:
    bad = corpus / "wav" / "U001.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
    utts = read_corpus_dir(corpus)
    with pytest.raises(ComflpError) as err:
        load_audio(utts[1].path, 16000, utt_id=utts[1].utt_id)
    assert "U001.wav" in str(err.value) and "U001" in str(err.value)


def test_downmix_and_resample(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "st.wav", 1.0, sr=8000, channels=2)
    wave = load_audio(path, 16000)
    assert wave.ndim == 1 and wave.dtype == np.float32
    assert abs(len(wave) - 16000) <= 2
    ref, _ = sf.read(path, dtype="float32")
    assert np.allclose(load_audio(path, 8000), ref.mean(axis=1))


def test_length_sorted_batches_keep_the_set(corpus: Path) -> None:
    utts = read_corpus_dir(corpus)
    batches = length_sorted_batches(utts, batch_size=4)
    assert [len(b) for b in batches] == [4, 2]
    assert sorted(u.utt_id for b in batches for u in b) == sorted(u.utt_id for u in utts)
    assert batches[0][0].utt_id == "U005"  # longest first
    by_time = length_sorted_batches(utts, max_seconds=2.5)
    assert all(max(0.5 + 0.1 * int(u.utt_id[1:]) for u in b) * len(b) <= 2.5 + 1e-9 or len(b) == 1 for b in by_time)


def test_collate_pads_and_masks(corpus: Path, tmp_path: Path) -> None:
    fe, _ = tiny_processor(tmp_path / "proc")
    utts = read_corpus_dir(corpus)[:3]
    batch = collate(utts, fe)
    assert batch.inputs.shape == (3, 11200)
    assert batch.lengths.tolist() == [8000, 9600, 11200]
    assert batch.attention_mask.sum(-1).tolist() == batch.lengths.tolist()
    assert torch.all(batch.inputs[0, 8000:] == 0)
    model = tiny_model()
    mask = frame_mask(model, batch.attention_mask, 1000)
    assert mask.sum(-1).tolist() == model._get_feat_extract_output_lengths(batch.lengths).tolist()


def test_kaldi_files_accept_tabs_and_a_bom(tmp_path: Path) -> None:
    from conftest import write_wav

    d = tmp_path / "c"
    write_wav(d / "a.wav", 0.3)
    write_wav(d / "b.wav", 0.3, seed=1)
    (d / "wav.scp").write_text("\ufeffA\ta.wav\nB  \t b.wav\n", encoding="utf-8")
    (d / "text").write_text("\ufeffA\t你好\nB 世界\n", encoding="utf-8")
    utts = read_corpus_dir(d)
    assert [(u.utt_id, u.text) for u in utts] == [("A", "你好"), ("B", "世界")]
    assert utts[1].path == d / "b.wav"


def test_written_corpus_dir_reads_back_the_same_rows(tmp_path: Path) -> None:
    from comflp.data import is_corpus_dir, write_corpus_dir

    rows = []
    for i, spk in enumerate(["S2", "S1", "S2"]):
        (tmp_path / "wav").mkdir(exist_ok=True)
        write_wav(tmp_path / "wav" / f"u{i}.wav", 0.1, seed=i)
        rows.append((f"u{i}", f"wav/u{i}.wav", f"第{i}句", spk))
    assert not is_corpus_dir(tmp_path / "c")
    write_corpus_dir(tmp_path / "c", [(u, f"../{w}", t, s) for u, w, t, s in rows])
    assert is_corpus_dir(tmp_path / "c")
    utts = read_corpus_dir(tmp_path / "c")
    assert [(u.utt_id, u.text, u.speaker) for u in utts] == [(u, t, s) for u, _, t, s in rows]
    assert (tmp_path / "c" / "spk2utt").read_text() == "S1 u1\nS2 u0 u2\n"
