"""The demo-model recipe: the one training loop, any depth, resumable only into the same recipe, ships an HF model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCTC

from comflp.demo.recipes import main

from conftest import make_corpus


def _train(tmp: Path, *extra: str) -> None:
    corpus = tmp / "corpus"
    if not corpus.exists():
        make_corpus(corpus, n=6)
    main(["train", "--num_layers", "2", "--steps", "5", "--warmup", "1", "--max_seconds", "3", "--threads", "1",
          "--train_data_dir", str(corpus), "--dev_data_dir", str(corpus), "--exp_dir", str(tmp / "exp"),
          "--output", str(tmp / "model"), *extra])


def test_trains_any_depth_resumes_only_the_same_recipe(tmp_path: Path, capsys) -> None:
    _train(tmp_path)
    model, info = AutoModelForCTC.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert model.config.num_hidden_layers == 2 and not info["missing_keys"] and not info["unexpected_keys"]
    rows = [json.loads(line) for line in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    # 6 utterances of 0.5-1 s in batches of <= 3 s of padded audio: 2 updates an epoch; the 5th update is
    # inside epoch 3, which is validated where training stops
    assert [(r["epoch"], r["update"]) for r in rows] == [(0, 0), (1, 2), (2, 4), (3, 5)]
    settings = json.loads((tmp_path / "exp" / "run.json").read_text())["settings"]
    assert (settings["schedule"], settings["warmup_updates"], settings["max_updates"]) == ("cosine", 1, 5)
    assert json.loads((tmp_path / "exp" / "last" / "position.json").read_text())["update"] == 5
    best = min(rows[1:], key=lambda r: r["valid_cer"])["epoch"]  # the shipped model is the best checkpoint
    shipped = AutoModelForCTC.from_pretrained(tmp_path / "model").state_dict()
    kept = AutoModelForCTC.from_pretrained(tmp_path / "exp" / f"epoch{best}").state_dict()
    assert all(torch.equal(shipped[k], kept[k].half().float()) for k in kept)
    # --resume of a finished run ships again (with --overwrite) without repeating a metrics row
    _train(tmp_path, "--resume", "--overwrite")
    assert len((tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()) == 4
    # another recipe in the same exp dir is refused, naming the difference
    with pytest.raises(SystemExit) as err:
        main(["train", "--num_layers", "3", "--steps", "4", "--warmup", "1", "--resume", "--threads", "1",
              "--train_data_dir", str(tmp_path / "corpus"), "--dev_data_dir", str(tmp_path / "corpus"),
              "--exp_dir", str(tmp_path / "exp"), "--output", str(tmp_path / "model3")])
    assert err.value.code != 0
    assert "init-2l' there" in capsys.readouterr().err and not (tmp_path / "exp" / "init-3l").exists()
