"""Every family through every command: a tiny random model goes measure -> search -> prune -> test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCTC

from comflp.cli import finetune
from comflp.cli import measure as analysis, model as cli, search as search_cli, testset as testset_cli
from comflp.model import front_end, load_model, num_layers

from conftest import FAMILIES, make_corpus, save_plain, tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("families") / "corpus", n=6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_search_prune_test(family: str, corpus: Path, tmp_path: Path) -> None:
    model = save_plain(tiny_model(family, seed=7), tmp_path / "model", tmp_path / "proc")
    npz = tmp_path / "m.npz"
    analysis.main(["--model", str(model), "--data_dir", str(corpus), "--batch_size", "3", "--iter_num", "2",
                   "--measures", "cosine,dc", "--no_plot", "--quiet", "--dump_dir", str(tmp_path), "--output", str(npz)])
    strategy = tmp_path / "s.json"
    search_cli.main(["--model", str(model), "--measure_file", str(npz), "--num_layers", "6", "--num_clip_layers", "2",
                     "--search_mode", "exact", "--topk_num", "3", "--verify_data_dir", str(corpus),
                     "--test_num_batch", "2", "--verify_batch_size", "3", "--log_dir", str(tmp_path), "--quiet",
                     "--output", str(strategy)])
    pick = json.loads(strategy.read_text())["candidates"][0]
    pruned = tmp_path / "pruned"
    cli.prune_main(["--model", str(model), "--strategy", str(strategy), "--rank", "1", "--output", str(pruned)])
    reloaded, info = AutoModelForCTC.from_pretrained(pruned, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = testset_cli.main(["--model", str(pruned), "--data_dir", str(corpus), "--batch_size", "1",
                               "--output_dir", str(tmp_path / "test")])
    assert report["num_layers"] == 4 and 0 <= report["error_rate"]
    # the saved pruned model scores the CER the fine search measured by switching layers off in batches of 3
    # (the subset is the whole corpus; every family decodes the same at any batch size)
    assert report["error_rate"] == pytest.approx(pick["cer"], abs=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_glp_then_finetune(family: str, corpus: Path, tmp_path: Path) -> None:
    """GLP picks layers by real CER, and fine-tuning (CTC + distillation) heals the pruned model of every family."""
    model = save_plain(tiny_model(family, seed=7), tmp_path / "model", tmp_path / "proc")
    glp = search_cli.glp_main(["--model", str(model), "--verify_data_dir", str(corpus), "--num_layers", "6",
                               "--num_clip_layers", "2", "--test_num_batch", "1", "--verify_batch_size", "3",
                               "--log_dir", str(tmp_path), "--quiet", "--output", str(tmp_path / "g.json")])
    pick = glp.candidates[0].pruned
    assert len(pick) == 2
    out = tmp_path / "ft"
    finetune.main(["--model", str(model), "--layers", ",".join(map(str, pick)), "--batch_size", "3", "--epochs", "1",
                   "--lr", "1e-3", "--test_num_batch", "1", "--valid_batch_size", "3", "--train_data_dir", str(corpus),
                   "--valid_data_dir", str(corpus), "--output_dir", str(out), "--threads", "1", "--quiet",
                   "--freeze_feature_encoder"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_loss"] is None and len(rows) == 2 and math.isfinite(rows[1]["train_loss"])
    healed, info = AutoModelForCTC.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and num_layers(healed) == 4
    before = load_model(model).model.state_dict()
    front = front_end(healed)
    front_prefix = next(name for name, m in healed.named_modules() if m is front) + "."
    changed = {k for k, v in healed.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed and not any(k.startswith(front_prefix) for k in changed)  # the front end stayed frozen
