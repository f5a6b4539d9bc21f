"""The artifact owner: the names it spells for other libraries' files are theirs, and its layouts round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comflp import artifacts
from comflp.artifacts import ExperimentDir
from comflp.demo.layout import ShippedModelDir
from comflp.errors import ComflpError


def test_hf_file_names_are_transformers_own() -> None:
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

    assert artifacts.WEIGHTS_FILE == SAFE_WEIGHTS_NAME
    assert ShippedModelDir("m").config_file.name == CONFIG_NAME


def test_saved_epochs_are_the_complete_checkpoints(tmp_path: Path) -> None:
    exp = ExperimentDir(tmp_path)
    for n in (1, 2, 10):
        exp.epoch(n).mkdir()
    for n in (2, 10):
        exp.weights(exp.epoch(n)).write_bytes(b"")
    (tmp_path / "epochs").mkdir()  # not an epoch dir, whatever it holds
    exp.weights(tmp_path / "epochs").write_bytes(b"")
    assert exp.saved_epochs() == [2, 10]


def test_a_resumed_epoch_replaces_its_metrics_row(tmp_path: Path) -> None:
    exp = ExperimentDir(tmp_path)
    for row in ({"epoch": 2, "valid_cer": 0.3}, {"epoch": 1, "valid_cer": 0.5}, {"epoch": 2, "valid_cer": 0.25}):
        exp.write_metrics_row(row)
    assert exp.read_metrics() == [{"epoch": 1, "valid_cer": 0.5}, {"epoch": 2, "valid_cer": 0.25}]
    with exp.metrics_file.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ComflpError, match=r"metrics.jsonl:3: corrupt metrics row"):
        exp.read_metrics()


def test_reopening_another_experiment_names_what_differs(tmp_path: Path) -> None:
    ExperimentDir.open(tmp_path / "ft", settings={"lr": 1e-4, "epochs": 3}, kind="finetune", afresh=False)
    ExperimentDir.open(tmp_path / "ft", settings={"lr": 1e-4, "epochs": 3}, kind="finetune", afresh=False)
    with pytest.raises(ComflpError, match=r"holds another experiment \(lr: 0.0001 there, 0.001 now\)"):
        ExperimentDir.open(tmp_path / "ft", settings={"lr": 1e-3, "epochs": 3}, kind="finetune", afresh=False)
    keep = tmp_path / "ft" / "notes.txt"
    keep.write_text("mine")
    exp = ExperimentDir.open(tmp_path / "ft", settings={"lr": 1e-3, "epochs": 3}, kind="finetune", afresh=True)
    assert exp.settings() == {"lr": 1e-3, "epochs": 3} and keep.read_text() == "mine"


def test_heatmaps_follow_the_matrix_file(tmp_path: Path) -> None:
    assert artifacts.heatmap_file(tmp_path, "dump/dc_mat_mean_bs4_iter10.npy", "dc").name == "dc_mat_mean_bs4_iter10.png"
    assert artifacts.heatmap_file(tmp_path, "dump/measures.npz", "cka").name == "measures_cka.png"


def test_shipped_model_without_results_reads_empty(tmp_path: Path) -> None:
    shipped = ShippedModelDir(tmp_path)
    assert shipped.results() == {}
    shipped.results_file.write_text(json.dumps({"test_cer": 0.1}))
    assert shipped.results() == {"test_cer": 0.1}
