"""HuggingFace datasets as corpora: the same utterances give the same CER as the Kaldi dir; bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from comflp.data import read_corpus_dir
from comflp.decode import transcribe
from comflp.errors import ComflpError
from comflp.hfdata import read_dataset
from comflp.model import load_model

from conftest import make_corpus, save_plain, tiny_model


@pytest.fixture(scope="module")
def kaldi(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("hf") / "kaldi", n=6)


def _saved(kaldi: Path, out: Path, *, split: str = "validation") -> Path:
    utts = read_corpus_dir(kaldi)
    table = datasets.Dataset.from_dict({"audio": [str(u.path) for u in utts], "sentence": [u.text for u in utts],
                                        "id": [u.utt_id for u in utts]}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({split: table}).save_to_disk(str(out))  # the audio bytes are embedded
    return out


def _audiofolder(kaldi: Path, out: Path) -> Path:
    (out / "test").mkdir(parents=True)
    rows = ["file_name,transcription"]
    for u in read_corpus_dir(kaldi):
        shutil.copy(u.path, out / "test" / u.path.name)
        rows.append(f"{u.path.name},{u.text}")
    (out / "test" / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def test_a_dataset_gives_the_cer_of_the_kaldi_dir(kaldi: Path, tmp_path: Path) -> None:
    loaded = load_model(save_plain(tiny_model("wav2vec2", seed=1), tmp_path / "m", tmp_path / "proc"))
    reference = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, read_corpus_dir(kaldi),
                           batch_size=3)
    saved = read_dataset(_saved(kaldi, tmp_path / "saved"), split="validation")
    folder = read_dataset(_audiofolder(kaldi, tmp_path / "folder"), split="test")
    assert [u.utt_id for u in saved] == [u.utt_id for u in read_corpus_dir(kaldi)]
    for utts in (saved, folder):
        got = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=2)
        assert got.hypotheses == reference.hypotheses
        assert got.score("char").rate == reference.score("char").rate
    # the saved dataset holds its audio bytes: it does not need the wav files any more
    moved = shutil.move(str(kaldi), str(tmp_path / "gone"))
    try:
        again = read_dataset(tmp_path / "saved", split="validation")
        got = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, again, batch_size=4)
        assert got.hypotheses == reference.hypotheses
    finally:
        shutil.move(moved, str(kaldi))


def test_bad_datasets_end_in_one_line_naming_the_culprit(kaldi: Path, tmp_path: Path) -> None:
    saved = _saved(kaldi, tmp_path / "saved")
    with pytest.raises(ComflpError, match="no split 'train'.*splits: validation"):
        read_dataset(saved, split="train")
    with pytest.raises(ComflpError, match="no audio column 'speech'.*columns: audio, sentence, id"):
        read_dataset(saved, split="validation", audio_column="speech")
    with pytest.raises(ComflpError, match="no column 'words'.*columns: audio, sentence, id"):
        read_dataset(saved, split="validation", text_column="words")
    folder = _audiofolder(kaldi, tmp_path / "folder")
    with pytest.raises(ComflpError, match="split 'dev'.*splits: test"):
        read_dataset(folder, split="dev")
    broken = tmp_path / "broken"
    table = datasets.Dataset.from_dict({"audio": [{"bytes": b"not audio at all", "path": "x.wav"}], "text": ["你好"]})
    table.save_to_disk(str(broken))
    utt = read_dataset(broken, split="train")[0]
    from comflp.data import load_audio

    with pytest.raises(ComflpError, match=r"broken\[train\]\[0\]"):
        load_audio(utt.path, 16000, utt_id=utt.utt_id)


def test_commands_take_a_dataset(kaldi: Path, tmp_path: Path) -> None:
    import json
    import subprocess

    from conftest import run_comflp

    model = save_plain(tiny_model("wav2vec2", seed=1), tmp_path / "m", tmp_path / "proc")
    saved = _saved(kaldi, tmp_path / "saved")

    def test(*args: str) -> subprocess.CompletedProcess:
        return run_comflp("test", "--model", str(model), *args)

    a = test("--data_dir", str(kaldi), "--output_dir", str(tmp_path / "a"))
    b = test("--dataset", str(saved), "--dataset_split", "validation", "--output_dir", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = (json.loads((tmp_path / d / "test_asr.json").read_text()) for d in "ab")
    assert ra["error_rate"] == rb["error_rate"] and ra["num_utterances"] == rb["num_utterances"] == 6
    bad = test("--dataset", str(saved), "--output_dir", str(tmp_path / "c"))  # the test command reads split "test"
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no split 'test'" in bad.stderr.strip().splitlines()[-1] and not (tmp_path / "c" / "test_asr.json").exists()
    m = run_comflp("measure", "--model", str(model), "--dataset", str(saved), "--dataset_split", "validation",
                   "--batch_size", "2", "--iter_num", "2", "--measures", "dc", "--no_plot", "--quiet",
                   "--dump_dir", str(tmp_path / "d"))
    assert m.returncode == 0, m.stderr


def test_a_missing_local_dataset_is_named_not_looked_up_on_the_hub(tmp_path: Path) -> None:
    for source in (str(tmp_path / "nowhere"), "./typo", "a/b/c"):
        with pytest.raises(ComflpError, match="dataset dir not found"):
            read_dataset(source, split="train")
