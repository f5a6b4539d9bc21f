"""The demo-model recipe: any depth, resumable only into the same recipe, ships an HF model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCTC

from comflp.demo.recipes import main

from conftest import make_corpus


def _train(tmp: Path, *extra: str) -> None:
    corpus = tmp / "corpus"
    if not corpus.exists():
        make_corpus(corpus, n=6)
    main(["train", "--num_layers", "2", "--steps", "4", "--warmup", "1", "--eval_every", "2", "--threads", "1",
          "--train_data_dir", str(corpus), "--dev_data_dir", str(corpus), "--exp_dir", str(tmp / "exp"),
          "--output", str(tmp / "model"), *extra])


def test_trains_any_depth_resumes_only_the_same_recipe(tmp_path: Path, capsys) -> None:
    _train(tmp_path)
    model, info = AutoModelForCTC.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert model.config.num_hidden_layers == 2 and not info["missing_keys"] and not info["unexpected_keys"]
    rows = [json.loads(line) for line in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    state = json.loads((tmp_path / "exp" / "last" / "state.json").read_text())
    assert state["step"] == 4
    # --resume of a finished run ships again (with --overwrite) without repeating a metrics row
    _train(tmp_path, "--resume", "--overwrite")
    assert len((tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()) == 2
    # another recipe in the same exp dir is refused, naming the difference
    with pytest.raises(SystemExit) as err:
        main(["train", "--num_layers", "3", "--steps", "4", "--warmup", "1", "--resume", "--threads", "1",
              "--train_data_dir", str(tmp_path / "corpus"), "--dev_data_dir", str(tmp_path / "corpus"),
              "--exp_dir", str(tmp_path / "exp"), "--output", str(tmp_path / "model3")])
    assert err.value.code != 0
    assert "num_layers: 2 there, 3 now" in capsys.readouterr().err
