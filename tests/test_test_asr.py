"""test_asr.py: the whole-set CER equals jiwer's on the decoded strings; outputs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import pytest

from conftest import make_corpus, run_script, save_plain, tiny_model

REPO = Path(__file__).resolve().parent.parent


def test_cer_equals_jiwer_on_decoded_strings(tmp_path: Path) -> None:
    model = save_plain(tiny_model("wav2vec2", seed=5), tmp_path / "m", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=6)
    out = run_script(REPO / "test_asr.py", "--model", str(model), "--data_dir", str(corpus),
                     "--output_dir", str(tmp_path / "exp"), "--batch_size", "4")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "exp" / "test_asr.json").read_text())
    hyps = dict(line.split(" ", 1) if " " in line else (line, "")
                for line in (tmp_path / "exp" / "hyp.txt").read_text(encoding="utf-8").splitlines())
    refs = dict(line.split(" ", 1) for line in (corpus / "text").read_text(encoding="utf-8").splitlines())
    ids = sorted(refs)
    expected = jiwer.cer([refs[i].replace(" ", "") for i in ids], [hyps[i].replace(" ", "") for i in ids])
    assert result["error_rate"] == pytest.approx(expected)
    assert result["num_utterances"] == 6 and result["num_layers"] == 6 and result["rtf"] > 0
    assert result["num_parameters"] > 0 and (tmp_path / "exp" / "test_asr.log").exists()


def test_missing_model_and_data_are_one_line(tmp_path: Path) -> None:
    out = run_script(REPO / "test_asr.py", "--model", str(tmp_path / "none"), "--output_dir", str(tmp_path / "e"))
    assert out.returncode == 2 and "model not found" in out.stderr and "Traceback" not in out.stderr
