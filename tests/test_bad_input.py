"""Bad input, as a stranger would give it: every case ends with one ``error:`` line naming the culprit,
exit status 2, no traceback, and no user file lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Model

from comflp.cli import average, finetune
from comflp.cli import measure as analysis, model as cli, search as search_cli
from comflp.cli import testset as test_asr
from comflp.cli.aishell import main as aishell_main
from comflp.artifacts import output_lock
from comflp.strategy import Candidate, StrategyFile

from conftest import save_plain, tiny_model


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    """Call a command's main in-process: (exit status, stderr). An uncaught exception fails the test."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def refused(main, argv: list[str], capsys, *needles: str) -> str:
    code, err = run(main, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- never destroy a user's files


def test_prune_never_replaces_a_users_dir_or_file(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    user_file = tmp_path / "notes.txt"
    user_file.write_text("precious")
    before = _snapshot(user_dir), _snapshot(user_file)
    for target in (user_dir, user_file):
        for extra in ([], ["--overwrite"]):
            refused(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(target), *extra],
                    capsys, str(target))
    assert (_snapshot(user_dir), _snapshot(user_file)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]  # nothing moved aside


def test_replacing_an_earlier_output_needs_overwrite(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    out = tmp_path / "pruned"
    assert run(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(out)], capsys)[0] == 0
    refused(cli.prune_main, ["--model", str(model), "--layers", "2", "--output", str(out)], capsys, "--overwrite")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    code, _ = run(cli.prune_main, ["--model", str(model), "--layers", "2,3", "--output", str(out), "--overwrite"],
                  capsys)
    assert code == 0 and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    # an empty dir the user made is fine to write into
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(empty)], capsys)[0] == 0


def test_second_writer_gets_one_line(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    out = tmp_path / "busy"
    with output_lock(out):
        refused(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(out)], capsys,
                "another comflp process")
        refused(finetune.main, ["--model", str(model), "--layers", "1", "--output_dir", str(out), "--epochs", "1",
                                "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus), "--quiet"],
                capsys, "another comflp process")
    assert not out.exists()


def test_matrix_outputs_respect_ownership(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    theirs = tmp_path / "dump" / "dc_mat_mean_bs2_iter2.npy"
    theirs.parent.mkdir()
    np.save(theirs, np.eye(7))
    before = theirs.read_bytes()
    argv = ["--model", str(model), "--data_dir", str(corpus), "--batch_size", "2", "--iter_num", "2",
            "--dump_dir", str(tmp_path / "dump"), "--figure_dir", str(tmp_path / "fig"), "--quiet"]
    refused(analysis.dc_main, argv, capsys, "not written by comflp")
    assert theirs.read_bytes() == before
    theirs.unlink()
    assert run(analysis.dc_main, argv, capsys)[0] == 0
    refused(analysis.dc_main, argv, capsys, "--overwrite")
    assert run(analysis.dc_main, argv + ["--overwrite"], capsys)[0] == 0
    assert (tmp_path / "fig" / "dc_mat_mean_bs2_iter2.png").is_file()


# --------------------------------------------------------------------------- no tracebacks


def test_corrupt_and_unsafe_weights(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(cli.info_main, [str(bad)], capsys, str(bad), "corrupt or truncated")
    refused(cli.prune_main, ["--model", str(bad), "--layers", "1", "--output", str(tmp_path / "o")], capsys,
            "corrupt or truncated")
    exp = tmp_path / "exp"
    shutil.copytree(bad, exp / "epoch1")
    (exp / "metrics.jsonl").write_text('{"epoch": 1, "valid_cer": 0.2}\n')
    refused(average.main, ["--exp_dir", str(exp), "--num", "1"], capsys, "epoch1", "corrupt or truncated")

    pickled = tmp_path / "pickled"
    shutil.copytree(model, pickled)
    (pickled / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Payload()}, pickled / "pytorch_model.bin")
    refused(cli.info_main, [str(pickled)], capsys, "refuses for safety")
    assert "unpickled!" not in capsys.readouterr().out


def test_legacy_pytorch_bin_loads(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    legacy = tmp_path / "legacy"
    shutil.copytree(model, legacy)
    (legacy / "model.safetensors").unlink()
    torch.save(tiny_model("wav2vec2-stable", seed=2).state_dict(), legacy / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    code, err = run(cli.info_main, [str(legacy), "--json"], capsys)
    assert code == 0, err


def test_bad_matrix_files(world, tmp_path: Path, capsys) -> None:
    cases = {"empty.npy": b"", "garbage.npy": b"not a numpy file", "garbage.npz": b"PK\x03\x04 broken"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "nosettings.npz", dc=np.eye(13))
    np.save(tmp_path / "complex.npy", np.eye(13) * (1 + 1j))
    np.save(tmp_path / "int.npy", np.eye(13, dtype=np.int64))
    expect = {"empty.npy": "cannot read", "garbage.npy": "cannot read", "garbage.npz": "cannot read",
              "nosettings.npz": "no 'settings'", "complex.npy": "complex", "int.npy": "integer"}
    for name, needle in expect.items():
        refused(search_cli.search_main, ["--measure_file", str(tmp_path / name), "--coarse_search_only", "true",
                                         "--output", str(tmp_path / "s.json"), "--log_dir", str(tmp_path)],
                capsys, needle, name)


def test_text_that_is_not_utf8(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    bad = tmp_path / "latin1"
    shutil.copytree(corpus, bad)
    (bad / "text").write_bytes("U000 caf\u00e9\n".encode("latin-1"))
    refused(test_asr.main, ["--model", str(model), "--data_dir", str(bad), "--output_dir", str(tmp_path / "t")],
            capsys, "text:1", "not UTF-8")


def test_unwritable_outputs(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(cli.prune_main, ["--model", str(model), "--layers", "1", "--output", str(blocker / "sub")], capsys,
            "is a file")
    refused(analysis.dc_main, ["--model", str(model), "--data_dir", str(corpus), "--batch_size", "2",
                               "--iter_num", "1", "--dump_dir", str(blocker), "--quiet"], capsys, "is a file")
    refused(test_asr.main, ["--model", str(model), "--data_dir", str(corpus), "--output_dir", str(blocker)], capsys,
            "is a file")
    refused(search_cli.search_main, ["--measure_file", str(tmp_path / "nope.npy"), "--output",
                                     str(tmp_path)], capsys, "directory")
    assert blocker.read_text() == "x"


def test_devices_and_sizes(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    base = ["--model", str(model), "--data_dir", str(corpus), "--output_dir", str(tmp_path / "t")]
    refused(test_asr.main, base + ["--device", "tpu7"], capsys, "tpu7")
    if not torch.cuda.is_available():
        refused(test_asr.main, base + ["--device", "cuda"], capsys, "CUDA is not available")
    refused(test_asr.main, base + ["--batch_size", "0"], capsys, "--batch_size", "positive")
    ft = ["--model", str(model), "--layers", "1", "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus),
          "--output_dir", str(tmp_path / "ft")]
    refused(finetune.main, ft + ["--grad_accum", "0"], capsys, "--grad_accum")
    refused(finetune.main, ft + ["--batch_size", "-1"], capsys, "--batch_size")
    refused(finetune.main, ft + ["--distill", "--temperature", "0"], capsys, "--temperature")
    refused(finetune.main, ft + ["--max_train_utts", "0"], capsys, "--max_train_utts")
    refused(search_cli.search_main, ["--topk_num", "0"], capsys, "--topk_num")
    refused(analysis.dc_main, ["--batch_size", "0"], capsys, "--batch_size")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "t").exists()


def test_corrupt_metrics_when_averaging(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    exp = tmp_path / "exp"
    shutil.copytree(model, exp / "epoch1")
    (exp / "metrics.jsonl").write_text('{"epoch": 1, "valid_cer": 0.2}\n{"epoch": 2, "valid_c')
    refused(average.main, ["--exp_dir", str(exp), "--num", "1"], capsys, "metrics.jsonl:2", "corrupt")


# --------------------------------------------------------------------------- no silent wrong results


def test_pretrained_only_model(world, tmp_path: Path, capsys) -> None:
    tmp, model, corpus = world
    headless = save_plain(Wav2Vec2Model(tiny_model("wav2vec2-stable").config), tmp_path / "headless",
                          tmp_path / "proc")
    out = tmp_path / "pruned"
    assert run(cli.prune_main, ["--model", str(headless), "--layers", "1", "--output", str(out)], capsys)[0] == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not any("lm_head" in k for k in f.keys())  # no invented head
    StrategyFile(6, [Candidate([1])]).save(tmp_path / "s.json")
    np.save(tmp_path / "m.npy", np.eye(7))
    refused(search_cli.search_main, ["--model", str(headless), "--num_layers", "6", "--num_clip_layers", "1",
                                     "--measure_file", str(tmp_path / "m.npy"), "--verify_data_dir", str(corpus),
                                     "--output", str(tmp_path / "o.json"), "--log_dir", str(tmp_path)],
            capsys, "no CTC head")


def test_degenerate_measures(world, tmp_path: Path, capsys) -> None:
    _, model, corpus = world
    base = ["--model", str(model), "--data_dir", str(corpus), "--dump_dir", str(tmp_path), "--no_plot", "--quiet"]
    refused(analysis.dc_main, base + ["--batch_size", "1", "--iter_num", "3"], capsys, "at least 2")
    refused(analysis.svcca_main, base + ["--batch_size", "1", "--iter_num", "1"], capsys, "at least 2")
    refused(analysis.measure_main, base + ["--measures", ","], capsys, "names no measure")
    refused(analysis.measure_main, base + ["--measures", "dc,bogus"], capsys, "bogus")
    assert not list(tmp_path.iterdir())


def test_layer_lists_and_strategy_files(world, tmp_path: Path, capsys) -> None:
    _, model, _ = world
    out = ["--output", str(tmp_path / "o")]
    refused(cli.prune_main, ["--model", str(model), "--layers", "5-3", *out], capsys, "reversed")
    for pruned, needle in (([1, True], "True"), ([1, 2.0], "2.0"), ([1, "3"], "'3'")):
        (tmp_path / "s.json").write_text(json.dumps({"num_layers": 6, "candidates": [{"pruned": pruned}]}))
        refused(cli.prune_main, ["--model", str(model), "--strategy", str(tmp_path / "s.json"), *out], capsys,
                needle)
    (tmp_path / "s.json").write_text(json.dumps({"num_layers": 6, "candidates": [{"blocks": [[3, 1]]}]}))
    refused(cli.prune_main, ["--model", str(model), "--strategy", str(tmp_path / "s.json"), *out], capsys, "reversed")
    assert not (tmp_path / "o").exists()


def test_test_asr_without_averaged_model(world, tmp_path: Path, capsys) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    refused(test_asr.main, ["--output_dir", str(exp)], capsys, "model_avg", "not found")
    assert not list(exp.iterdir())


def test_prepare_aishell_checks_every_split_first(tmp_path: Path, capsys) -> None:
    from conftest import write_wav

    root = tmp_path / "data_aishell"
    (root / "transcript").mkdir(parents=True)
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text("BAC009S0002W0122 而 对 楼市\n")
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav", 0.5)
    write_wav(root / "wav" / "test" / "S0002" / "BAC009S0002W0122.wav", 0.5)
    out = tmp_path / "out"
    refused(aishell_main, [str(root), "--output", str(out)], capsys, "wav/dev")
    assert not out.exists()  # the train split was not written before the dev split was found missing
    write_wav(root / "wav" / "dev" / "S0003" / "BAC009S0003W0001.wav", 0.5)
    refused(aishell_main, [str(root), "--output", str(out)], capsys, "none of the 1 wav files")
    assert not out.exists()


def test_model_saved_without_processor(world, tmp_path: Path, capsys) -> None:
    plain = tmp_path / "plain"
    tiny_model("wav2vec2-stable").save_pretrained(plain)  # no preprocessor_config.json, no vocab
    code, err = run(cli.info_main, [str(plain), "--json"], capsys)
    assert code == 0, err
    out = tmp_path / "pruned"
    code, err = run(cli.prune_main, ["--model", str(plain), "--layers", "1", "--output", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
