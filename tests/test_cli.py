"""The command line as a user runs it: the ``comflp`` dispatcher with its exit codes and one-line errors, called
in this process (a subprocess per call would spend seconds importing torch); ``python -m comflp`` itself runs
as a subprocess once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCTC

from comflp.strategy import Candidate, StrategyFile

from conftest import run_comflp


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``comflp <args>`` through the dispatcher the console script calls, in this process, run in ``cwd``."""
    return run_comflp(*args, cwd=cwd)


def test_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "comflp", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "info" in out.stdout and "prune" in out.stdout
    sub = run("prune", "--help")
    assert sub.returncode == 0 and "--strategy" in sub.stdout and "--rank" in sub.stdout


def test_info_json_on_plain_transformers_model(tiny_model_dir: Path) -> None:
    out = run("info", str(tiny_model_dir), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["num_layers"] == 6 and info["family"] == "wav2vec2" and info["hidden_size"] == 32
    assert info["vocab_size"] == 12
    assert info["num_parameters"] == sum(p.numel() for p in AutoModelForCTC.from_pretrained(tiny_model_dir).parameters())


def test_prune_by_layers_then_plain_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = run("prune", "--model", str(tiny_model_dir), "--layers", "2,4-5", "--output", str(tmp_path / "p"))
    assert out.returncode == 0, out.stderr
    model = AutoModelForCTC.from_pretrained(tmp_path / "p")
    assert model.config.num_hidden_layers == 3
    full = AutoModelForCTC.from_pretrained(tiny_model_dir)
    kept = [0, 2, 5]
    for new_i, old_i in enumerate(kept):
        assert torch.equal(model.wav2vec2.encoder.layers[new_i].feed_forward.output_dense.weight,
                           full.wav2vec2.encoder.layers[old_i].feed_forward.output_dense.weight)
    assert json.loads(run("info", str(tmp_path / "p"), "--json").stdout)["num_layers"] == 3


def test_prune_by_strategy_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    StrategyFile(6, [Candidate([1, 2]), Candidate([6])]).save(tmp_path / "s.json")
    out = run("prune", "--model", str(tiny_model_dir), "--strategy", str(tmp_path / "s.json"), "--rank", "2",
              "--output", str(tmp_path / "p"))
    assert out.returncode == 0, out.stderr
    assert AutoModelForCTC.from_pretrained(tmp_path / "p").config.num_hidden_layers == 5


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_prune_errors_are_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert "need 0 < K < 6" in _one_line_error(run("prune", "--model", str(tiny_model_dir), "--layers", "1-6",
                                                   "--output", str(tmp_path / "p")))
    StrategyFile(12, [Candidate([1, 2])]).save(tmp_path / "s12.json")
    msg = _one_line_error(run("prune", "--model", str(tiny_model_dir), "--strategy", str(tmp_path / "s12.json"),
                              "--output", str(tmp_path / "p")))
    assert "12-layer" in msg and "6 layers" in msg
    assert "model not found" in _one_line_error(run("info", str(tmp_path / "nothing" / "here")))
    assert not (tmp_path / "p").exists()


def test_usage_and_errors_name_the_command_that_was_run(capsys) -> None:
    """`comflp finetune` shares its parser with the paper's clip_finetune_train.py; each names itself."""
    from comflp.cli import finetune, main, search

    for argv, name in ((["finetune", "--seed", "x"], "comflp finetune"), (["glp", "--threads", "0"], "comflp glp"),
                       (["test", "--batch_size", "0"], "comflp test"), (["average", "--num", "0"], "comflp average")):
        with pytest.raises(SystemExit):
            main(argv)
        assert capsys.readouterr().err.startswith(f"error: {name}: argument")
    with pytest.raises(SystemExit):
        finetune.main(["--seed", "x"])
    assert capsys.readouterr().err.startswith("error: python clip_finetune_train.py: argument --seed")
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "--threads" in capsys.readouterr().out
    assert search.search_parser().prog == "python search_strategy/search_prune_then_verify_mix.py"


def test_comflp_commands_write_default_outputs_below_the_working_dir(tiny_model_dir: Path, corpus: Path,
                                                                    tmp_path: Path) -> None:
    """`comflp measure` / `comflp search` put dump/, figure/, exp/ and the search log where they are run (an
    installed package has no checkout to write into); the paper's scripts keep the checkout's layout."""
    from comflp import paths

    work = tmp_path / "work"
    work.mkdir()
    out = run("measure", "--model", str(tiny_model_dir), "--data_dir", str(corpus), "--measures", "cosine",
              "--batch_size", "3", "--iter_num", "2", "--quiet", cwd=work)
    assert out.returncode == 0, out.stderr
    out = run("search", "--coarse_search_only", "true", "--num_layers", "6", "--num_clip_layers", "2", cwd=work)
    assert out.returncode == 0, out.stderr
    made = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert made == ["dump/measure.log", "dump/measures_bs3_iter2_U.npz", "exp/search/clip6to4_cosine_exhaustive.json",
                    "figure/measures_bs3_iter2_U_cosine.png",
                    "search_strategy/log/clip6to4_search_then_verify_cosine_exhaustive.log"]
    assert paths.output_root() == paths.REPO_ROOT  # outside the dispatcher: the paper's layout
    with paths.outputs_in_working_dir():
        assert paths.dump_dir() == Path.cwd() / "dump"


def test_quiet_shows_no_progress_bar_not_even_transformers_weight_loading(tiny_model_dir: Path, corpus: Path,
                                                                           tmp_path: Path) -> None:
    """`--quiet` promises no progress bars: transformers' weight-loading bar is silenced too (a fresh process,
    as a user runs it); without it the bar is there."""
    import os

    # the environment of a user's shell (an in-process --quiet earlier in this worker set the variable)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}

    def stderr(*flags: str) -> str:
        out = subprocess.run([sys.executable, "-m", "comflp", "measure", "--model", str(tiny_model_dir), "--data_dir",
                              str(corpus), "--batch_size", "2", "--iter_num", "1", "--measures", "cosine",
                              "--no_plot", "--overwrite", "--output", str(tmp_path / "m.npz"), *flags],
                             capture_output=True, text=True, cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "Loading weights" in stderr()
    quiet = stderr("--quiet")
    assert "Loading weights" not in quiet and "it/s]" not in quiet, quiet
