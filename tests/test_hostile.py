"""The second hostile-input sweep (issue 22): full disks, seeds and optimizer flags, symlinked outputs, refused
commands that wrote a file, silent wrong answers and inputs that disagree with themselves. Every case asserts
the exit code, one ``error:`` line, no traceback, and the user's files byte-identical (or, for a case that
used to pass silently, the refusal)."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comflp import atomic
from comflp.cli import COMMANDS, average, finetune, measure as analysis, model as cli, search as search_cli
from comflp.cli import testset as test_asr
from comflp.cli.argtypes import NUMERIC_TYPES, SEED_MAX, threads
from comflp.data import read_corpus_dir
from comflp.errors import ComflpError
from comflp.finetune import FinetuneConfig, lr_factor
from comflp.hidden import MAX_PASSES, MeasureSettings, select_utterances
from comflp.paths import REPO_ROOT

from conftest import make_corpus, tiny_model
from test_bad_input import _snapshot, refused, run


# --------------------------------------------------------------------------- one check for every numeric flag


class _Parser(BaseException):
    """Raised by the patched parse_args to hand the parser out (BaseException: no handler catches it)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _every_parser(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, the paper scripts' and the benches': each main is called and its parser caught."""
    def capture(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    mains = {name: target for name, (target, _) in COMMANDS.items()}
    mains.update({"dc_analysis.py": "comflp.cli.measure:dc_main", "svcca_analysis.py": "comflp.cli.measure:svcca_main",
                  "search_prune_then_verify_mix.py": "comflp.cli.search:search_main",
                  "python -m comflp.demo": "comflp.demo.recipes:main"})
    found = {}
    for name, target in mains.items():
        module, function = target.split(":")
        with pytest.raises(_Parser) as caught:
            getattr(importlib.import_module(module), function)([])
        found[name] = caught.value.parser
    for path in sorted((REPO_ROOT / "bench").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(_Parser) as caught:
            module.main()
        found[f"bench/{path.name}"] = caught.value.parser
    for name, parser in list(found.items()):  # sub-commands (python -m comflp.demo train|whisper-init|card ...)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update({f"{name} {sub}": p for sub, p in action.choices.items()})
    return found


def test_every_numeric_flag_is_range_checked_and_its_default_is_in_range(monkeypatch) -> None:
    parsers = _every_parser(monkeypatch)
    assert len(parsers) > 25
    bare, out_of_range, numeric = [], [], 0
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.type in (int, float) and not action.choices:  # choices are a range check
                bare.append(f"{name} {action.option_strings[0]}")
            if action.type in NUMERIC_TYPES:
                numeric += 1
                defaults = action.default if isinstance(action.default, (list, tuple)) else [action.default]
                for value in defaults:
                    if value is None or action.type is threads:  # threads: the default is checked per machine
                        continue
                    try:
                        action.type(str(value))
                    except argparse.ArgumentTypeError:
                        out_of_range.append(f"{name} {action.option_strings[0]} {value}")
    assert numeric > 80
    assert bare == [], f"numeric flags without a range check: {bare}"
    assert out_of_range == [], f"defaults outside their own range: {out_of_range}"


@pytest.mark.parametrize("argv,flag", [
    (["--seed", "99999999999999999999"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "100000"], "--threads"),
])
def test_measure_seeds_and_threads(world, argv, flag, capsys) -> None:
    _, model, corpus = world
    line = refused(analysis.measure_main, ["--model", str(model), "--data_dir", str(corpus), *argv], capsys, flag)
    assert "at most" in line or str(SEED_MAX) in line


@pytest.mark.parametrize("argv,flag", [
    (["--seed", "-5"], "--seed"),
    (["--seed", str(SEED_MAX + 1)], "--seed"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--adam_beta2", "1.5"], "--adam_beta2"),
    (["--max_grad_norm", "0"], "--max_grad_norm"),
    (["--max_grad_norm", "-1"], "--max_grad_norm"),
    (["--warmup_updates", "-1"], "--warmup_updates"),
    (["--layerdrop", "1"], "--layerdrop"),
    (["--distill_weight", "nan"], "--distill_weight"),
    (["--resume_epoch", "-2"], "--resume_epoch"),
    (["--lr", "inf"], "--lr"),
])
def test_finetune_flags_out_of_range(world, tmp_path: Path, argv, flag, capsys) -> None:
    _, model, corpus = world
    out = tmp_path / "ft"
    refused(finetune.main, ["--model", str(model), "--layers", "1", "--output_dir", str(out), "--train_data_dir",
                            str(corpus), "--valid_data_dir", str(corpus), "--quiet", *argv], capsys, flag)
    assert not out.exists()


def test_the_library_checks_the_same_ranges() -> None:
    for bad in ({"max_grad_norm": 0.0}, {"weight_decay": -1.0}, {"adam_beta2": 1.5}, {"seed": -5},
                {"warmup_updates": -1}, {"layerdrop": 1.0}, {"lr": math.nan}):
        with pytest.raises(ComflpError, match=f"--{next(iter(bad))}"):
            FinetuneConfig(**bad).validate()
    FinetuneConfig().validate()


# --------------------------------------------------------------------------- the learning-rate schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_update_trains_and_the_warm_up_peaks_at_its_last_update(schedule: str) -> None:
    total, warmup = 20, 4
    factors = [lr_factor(n, warmup=warmup, total=total, schedule=schedule) for n in range(1, total + 1)]
    assert factors[:warmup] == [0.25, 0.5, 0.75, 1.0]  # update n of the warm-up: n / W of the peak
    assert all(0 < f <= 1 for f in factors)
    assert all(a > b for a, b in zip(factors[warmup - 1:], factors[warmup:]))  # then strictly decaying
    assert lr_factor(1, warmup=0, total=1, schedule=schedule) > 0
    assert lr_factor(1, warmup=1, total=1, schedule=schedule) == 1.0


def test_one_update_moves_the_weights(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    out = tmp_path / "ft"
    code, err = run(finetune.main, ["--model", str(model), "--layers", "1", "--output_dir", str(out),
                                    "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus), "--quiet",
                                    "--max_updates", "1", "--batch_size", "2", "--grad_accum", "1",
                                    "--test_num_batch", "1", "--valid_batch_size", "2", "--threads", "1"], capsys)
    assert code == 0, err
    trained = load_file(str(out / "final" / "model.safetensors"))
    start = tiny_model("wav2vec2-stable", seed=2).state_dict()  # the world fixture's model
    # layer 2 of the source is layer 1 of the pruned model
    name = "wav2vec2.encoder.layers.0.feed_forward.output_dense.weight"
    source = start[name.replace("layers.0", "layers.1")]
    assert (trained[name] - source).abs().max() > 1e-6


# --------------------------------------------------------------------------- full disks


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_writers_name_the_target_on_a_full_disk(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(OSError) as caught:
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            _no_space()
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    out_dir = tmp_path / "model"
    with pytest.raises(OSError) as caught:
        with atomic.atomic_dir(out_dir) as tmp:
            (tmp / "config.json").write_text("{}")
            # what safetensors' Rust writer raises
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.filename == str(out_dir) and caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file or dir left behind


def test_prune_onto_a_full_disk(world, tmp_path: Path, monkeypatch, capsys) -> None:
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    _, model, _ = world
    real = PreTrainedModel.save_pretrained

    def half_then_full(self, save_directory, *args, **kwargs):
        real(self, save_directory, *args, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then_full)
    out = tmp_path / "pruned"
    line = refused(cli.prune_main, ["--model", str(model), "--layers", "1,2", "--output", str(out)], capsys,
                   str(out), "No space left on device", "cannot write")
    assert line.startswith("error: cannot write")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_a_log_that_cannot_be_written_stops_the_command_in_one_line(world, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    from comflp.logs import LogFile

    class FullDisk:
        def write(self, text):
            _no_space()

        def flush(self):
            _no_space()

        def close(self):
            pass

    _, model, corpus = world
    matrix = tmp_path / "m.npz"
    run(analysis.measure_main, ["--model", str(model), "--data_dir", str(corpus), "--batch_size", "4", "--iter_num",
                                "2", "--measures", "cosine", "--no_plot", "--quiet", "--dump_dir", str(tmp_path),
                                "--output", str(matrix)], capsys)
    def full_disk_file(self):
        Path(self.baseFilename).touch()  # the file is created; its first write meets the full disk
        return FullDisk()

    monkeypatch.setattr(logging.FileHandler, "_open", full_disk_file)
    log_dir = tmp_path / "log"
    out = tmp_path / "s.json"
    try:
        code, err = run(search_cli.main, ["--coarse_search_only", "true", "--num_layers", "6", "--num_clip_layers",
                                          "2", "--measure_file", str(matrix), "--log_dir", str(log_dir), "--output",
                                          str(out)], capsys)
    finally:
        for h in [h for h in logging.getLogger().handlers if isinstance(h, LogFile)]:
            logging.getLogger().removeHandler(h)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert str(log_dir) in lines[0] and "No space left on device" in lines[0]
    assert not out.exists()
    assert not log_dir.exists()  # the empty log, and the dir made for it, are gone


def test_a_dir_that_cannot_be_marked_is_not_left_behind(world, tmp_path: Path, monkeypatch, capsys) -> None:
    from comflp.artifacts import ownership

    _, model, corpus = world
    monkeypatch.setattr(ownership, "mark_dir", _no_space)  # where open_output_dir calls it
    out = tmp_path / "deep" / "t"
    refused(test_asr.main, ["--model", str(model), "--data_dir", str(corpus), "--output_dir", str(out)], capsys,
            "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- a user's file or link


def test_overwrite_through_a_symlink_replaces_its_target_and_keeps_the_link(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    real = tmp_path / "disk2" / "pruned"
    assert run(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(real)], capsys)[0] == 0
    link = tmp_path / "pruned"
    link.symlink_to(real)
    code, err = run(cli.prune_main, ["--model", str(model), "--layers", "1,2", "--output", str(link),
                                     "--overwrite"], capsys)
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "config.json").read_text())["num_hidden_layers"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk2", "pruned"]  # nothing moved aside
    # a link to a user's dir is refused like the dir itself
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / "to_mine").symlink_to(mine)
    refused(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(tmp_path / "to_mine"),
                             "--overwrite"], capsys, "not written by comflp")
    assert _snapshot(mine) == {"thesis.tex": b"years of work"}


def test_a_dangling_link_is_named_and_nothing_is_written(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    line = refused(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(link)], capsys,
                   str(link), "nowhere", "does not exist")
    assert ".out." not in line  # not comflp's temp name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_refused_command_writes_nothing(world, tmp_path: Path, capsys) -> None:
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    refused(average.main, ["--exp_dir", str(users)], capsys, "no epoch")
    assert _snapshot(users) == {"notes.txt": b"mine"}
    _, model, corpus = world
    log_dir = tmp_path / "log"
    refused(search_cli.main, ["--coarse_search_only", "true", "--measure_file", str(tmp_path / "none.npz"),
                              "--log_dir", str(log_dir)], capsys, "none.npz")
    assert not log_dir.exists()


def test_corpus_never_replaces_a_users_dir(tmp_path: Path, capsys) -> None:
    from comflp.demo.corpus import main as corpus_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        refused(corpus_main, ["--output", str(mine), "--num_train", "1", "--num_dev", "1", "--num_test", "1",
                              "--speakers", "1", "1", "1", *extra], capsys, str(mine), "not written by comflp")
    assert _snapshot(mine) == {"thesis.tex": b"years of work"}


# --------------------------------------------------------------------------- silent wrong results


def test_a_dataset_and_a_kaldi_dir_at_once(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    refused(test_asr.main, ["--model", str(model), "--dataset", str(tmp_path), "--data_dir", str(corpus)], capsys,
            "--dataset", "--data_dir")
    refused(finetune.main, ["--model", str(model), "--layers", "1", "--dataset", str(tmp_path), "--valid_data_dir",
                            str(corpus)], capsys, "--dataset", "--valid_data_dir")
    refused(search_cli.main, ["--model", str(model), "--dataset", str(tmp_path), "--verify_data_dir", str(corpus)],
            capsys, "--dataset", "--verify_data_dir")


def test_measuring_refuses_repeated_clips_and_endless_passes(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    one = make_corpus(tmp_path / "one", n=1)
    dump = tmp_path / "dump"
    common = ["--model", str(model), "--dump_dir", str(dump), "--figure_dir", str(tmp_path / "fig"), "--quiet"]
    refused(analysis.dc_main, common + ["--data_dir", str(one)], capsys, "needs 4 distinct utterances", "has 1")
    refused(analysis.dc_main, common + ["--data_dir", str(corpus), "--batch_size", "100000", "--iter_num", "1"],
            capsys, "100000")
    refused(analysis.dc_main, common + ["--data_dir", str(corpus), "--iter_num", "1000000000"], capsys,
            "--iter_num", f"at most {MAX_PASSES}")
    assert not dump.exists() and not (tmp_path / "fig").exists()
    # a streamed measure does not depend on the batch: a batch larger than the corpus is run in forward passes
    # of at most the corpus, and gives the matrix of a small batch over the same utterances
    matrices = {}
    for batch, iters in ((16, 1), (2, 8)):
        out = tmp_path / f"m{batch}.npz"
        code, err = run(analysis.measure_main, ["--model", str(model), "--data_dir", str(corpus), "--measures",
                                                "cosine,cka", "--batch_size", str(batch), "--iter_num", str(iters),
                                                "--no_plot", "--quiet", "--dump_dir", str(tmp_path), "--output",
                                                str(out)], capsys)
        assert code == 0, err
        with np.load(out, allow_pickle=False) as z:
            matrices[batch] = {k: z[k] for k in ("cosine", "cka")}
    for k in ("cosine", "cka"):
        np.testing.assert_allclose(matrices[16][k], matrices[2][k], atol=1e-6)


def test_repeated_utterances_never_share_a_batch_and_one_pass_is_unchanged(world) -> None:
    _, _, corpus = world
    utts = read_corpus_dir(corpus)  # 8 utterances
    settings = MeasureSettings(batch_size=3, iter_num=7, seed=5)
    chosen = select_utterances(utts, settings)
    assert len(chosen) == 21
    for start in range(0, 21, 3):
        batch = [u.utt_id for u in chosen[start: start + 3]]
        assert len(set(batch)) == 3, batch
    # within one pass the sample is the seeded permutation's prefix, as before (bit-equal matrices)
    few = select_utterances(utts, MeasureSettings(batch_size=3, iter_num=2, seed=5))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))[:6].tolist()
    assert [u.utt_id for u in few] == [utts[i].utt_id for i in order]


def _dataset_with(tmp_path: Path, corpus: Path, **columns) -> Path:
    utts = read_corpus_dir(corpus)
    table = datasets.Dataset.from_dict({"audio": [str(u.path) for u in utts],
                                        **{k: v(utts) for k, v in columns.items()}})
    out = tmp_path / "ds"
    table.cast_column("audio", datasets.Audio()).save_to_disk(str(out))
    return out


def test_a_text_column_that_is_not_text_and_an_empty_split(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    ds = _dataset_with(tmp_path, corpus, label=lambda utts: list(range(len(utts))),
                       text=lambda utts: [u.text for u in utts])
    for column in ("label", "audio"):
        refused(test_asr.main, ["--model", str(model), "--dataset", str(ds), "--dataset_split", "train",
                                "--text_column", column, "--output_dir", str(tmp_path / "t")], capsys,
                f"column {column!r}", "not transcripts")
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"audio": [], "text": []}).save_to_disk(str(empty))
    refused(test_asr.main, ["--model", str(model), "--dataset", str(empty), "--dataset_split", "train",
                            "--output_dir", str(tmp_path / "t")], capsys, "has no rows")
    both = tmp_path / "dict"
    rows = datasets.Dataset.from_dict({"audio": [str(u.path) for u in read_corpus_dir(corpus)],
                                       "text": [u.text for u in read_corpus_dir(corpus)]})
    datasets.DatasetDict({"test": rows.cast_column("audio", datasets.Audio()),
                          "validation": datasets.Dataset.from_dict({"audio": [], "text": []})}).save_to_disk(str(both))
    refused(test_asr.main, ["--model", str(model), "--dataset", str(both), "--dataset_split", "validation",
                            "--output_dir", str(tmp_path / "t")], capsys, "[validation] has no rows")
    # the other split still reads, though the library cannot load the dict whole
    assert run(test_asr.main, ["--model", str(model), "--dataset", str(both), "--dataset_split", "test",
                               "--output_dir", str(tmp_path / "ok")], capsys)[0] == 0
    assert not (tmp_path / "t").exists()


def test_a_whisper_decoder_on_transcripts_it_cannot_spell(tmp_path: Path, capsys) -> None:
    from test_whisper import _whisper_dir

    model = _whisper_dir(tmp_path)
    latin = make_corpus(tmp_path / "latin", n=6, texts=["abc xyz"] * 6)
    refused(analysis.measure_main, ["--model", str(model), "--data_dir", str(latin), "--stack", "decoder",
                                    "--batch_size", "3", "--iter_num", "2", "--measures", "cosine", "--no_plot",
                                    "--quiet", "--dump_dir", str(tmp_path / "dump")], capsys,
            "100% of the tokens", "unknown to the model's tokenizer")
    assert not (tmp_path / "dump").exists()


@pytest.mark.parametrize("depth,held", [(8, 6), (4, 6)])
def test_a_config_that_disagrees_with_its_weights(world, tmp_path: Path, depth: int, held: int, capsys) -> None:
    _, model, corpus = world
    edited = tmp_path / "edited"
    shutil.copytree(model, edited)
    config = json.loads((edited / "config.json").read_text())
    config["num_hidden_layers"] = depth
    (edited / "config.json").write_text(json.dumps(config))
    needle = f"config.json says {depth} encoder layers (num_hidden_layers), the weights hold {held}"
    refused(test_asr.main, ["--model", str(edited), "--data_dir", str(corpus), "--output_dir",
                            str(tmp_path / "t")], capsys, needle)
    refused(cli.info_main, [str(edited)], capsys, needle)
    refused(cli.prune_main, ["--model", str(edited), "--layers", "1", "--output", str(tmp_path / "p")], capsys,
            needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


# --------------------------------------------------------------------------- messages


def test_a_missing_path_is_not_looked_up_on_the_hub(world, tmp_path: Path, monkeypatch, capsys) -> None:
    _, _, corpus = world
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./nonexist", "models/nonexist", "../nowhere/x", "a/b/c"):
        refused(test_asr.main, ["--model", name, "--data_dir", str(corpus)], capsys, f"model not found: {name}")


def test_info_on_a_ctc_model_has_no_decoder_line(world, capsys) -> None:
    _, model, _ = world
    capsys.readouterr()
    cli.info_main([str(model)])
    shown = capsys.readouterr().out
    assert "num_layers" in shown and "decoder_layers" not in shown
    cli.info_main([str(model), "--json"])
    assert "decoder_layers" not in json.loads(capsys.readouterr().out)


def test_a_corpus_made_before_the_mark_is_replaced_with_overwrite(tmp_path: Path, capsys) -> None:
    from comflp.artifacts import dir_kind
    from comflp.demo.layout import corpus_manifest
    from comflp.demo.corpus import main as corpus_main

    earlier = tmp_path / "demo"
    (earlier / "train").mkdir(parents=True)
    corpus_manifest(earlier).write_text(json.dumps({"config": {}, "espeakng_loader": "0", "vocab": "你"}))
    tiny = ["--output", str(earlier), "--num_train", "1", "--num_dev", "1", "--num_test", "1", "--speakers", "1",
            "1", "1", "--vocab_size", "20"]
    refused(corpus_main, tiny, capsys, "--overwrite")
    code, err = run(corpus_main, tiny + ["--overwrite"], capsys)
    assert code == 0, err
    assert dir_kind(earlier) == "corpus"
    assert len(read_corpus_dir(earlier / "test")) == 1
