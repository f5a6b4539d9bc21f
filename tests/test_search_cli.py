"""The search front-ends as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from comflp.strategy import StrategyFile

from conftest import make_corpus, run_script, save_plain, tiny_model

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "search_strategy" / "search_prune_then_verify_mix.py"
REFERENCE = REPO / "tests" / "data" / "paper"


def run(script: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The paper script as a user runs it (in this process: :func:`conftest.run_script`)."""
    return run_script(script, *args, cwd=cwd or REPO)


def _error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr.strip().splitlines()[-1]


def test_coarse_only_on_paper_matrix_from_any_directory(tmp_path: Path) -> None:
    out = run(SCRIPT, "--num_layers", "12", "--num_clip_layers", "6", "--search_mode", "exact",
              "--measure_file", str(REFERENCE / "dc_mat_mean_bs32_iter10.npy"), "--coarse_search_only", "true",
              "--output", str(tmp_path / "s.json"), "--log_dir", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    s = StrategyFile.load(tmp_path / "s.json")
    assert s.num_layers == 12 and s.pick(1).pruned == [1, 3, 4, 7, 9, 11] and len(s.candidates) == 10
    assert "0.971010" in out.stdout  # the ranked table
    assert any(p.suffix == ".log" for p in tmp_path.iterdir())


def test_errors(tmp_path: Path) -> None:
    ref = str(REFERENCE / "dc_mat_mean_bs32_iter10.npy")
    common = ["--coarse_search_only", "true", "--log_dir", str(tmp_path), "--output", str(tmp_path / "s.json")]
    msg = _error(run(SCRIPT, "--num_layers", "12", "--num_clip_layers", "12", "--measure_file", ref, *common))
    assert "need 0 < K < 12" in msg
    msg = _error(run(SCRIPT, "--num_layers", "24", "--num_clip_layers", "6", "--measure_file", ref, *common))
    assert "13x13 but a 24-layer model needs 25x25" in msg
    bad = np.load(ref).astype(np.float64)
    bad[3, 4] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert "NaN" in _error(run(SCRIPT, "--measure_file", str(tmp_path / "nan.npy"), *common))
    msg = _error(run(SCRIPT, "--bs", "7", "--iter", "3", *common))
    assert "dc_mat_mean_bs7_iter3.npy" in msg and "--bs 7 --iter 3" in msg
    assert not (tmp_path / "s.json").exists()


def test_fine_search_and_glp_on_a_model(tmp_path: Path) -> None:
    model_dir = save_plain(tiny_model("wav2vec2", seed=2), tmp_path / "m", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=6)
    rng = np.random.default_rng(0)
    a = rng.random((7, 7))
    np.save(tmp_path / "m.npy", (a + a.T) / 2)
    common = ["--model", str(model_dir), "--verify_data_dir", str(corpus), "--num_layers", "6",
              "--num_clip_layers", "2", "--test_num_batch", "2", "--verify_batch_size", "2",
              "--log_dir", str(tmp_path), "--quiet"]
    out = run(SCRIPT, *common, "--measure_file", str(tmp_path / "m.npy"), "--topk_num", "4", "--race", "false",
              "--output", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    raw = json.loads((tmp_path / "s.json").read_text())
    cers = [c["cer"] for c in raw["candidates"]]
    assert len(cers) == 4 and cers == sorted(cers)
    assert raw["meta"]["verify_utterances"] == 4
    raced = run(SCRIPT, *common, "--measure_file", str(tmp_path / "m.npy"), "--topk_num", "4",  # racing: the default
                "--output", str(tmp_path / "r.json"))
    assert raced.returncode == 0, raced.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["meta"]["race"] is True and len(r["meta"]["decoded_utterances"]) == 4
    assert r["candidates"][0] == raw["candidates"][0]  # the pick of full evaluation
    assert "race round" in (tmp_path / "clip6to4_search_then_verify_bs32_iter10_exhaustive.log").read_text()
    assert "--race_confidence: must be in [0.5, 1), got 1.5" in _error(run(SCRIPT, *common, "--measure_file", str(tmp_path / "m.npy"),
                                                  "--race", "true", "--race_confidence", "1.5"))
    glp = run(REPO / "search_strategy" / "wer_based_greedy_search.py", *common, "--output", str(tmp_path / "g.json"))
    assert glp.returncode == 0, glp.stderr
    g = json.loads((tmp_path / "g.json").read_text())
    assert len(g["candidates"][0]["pruned"]) == 2 and len(g["meta"]["path"]) == 2
    wrong = run(SCRIPT, *[c if c != "6" else "5" for c in common], "--measure_file", str(tmp_path / "m.npy"))
    assert "7x7 but a 5-layer model" in _error(wrong)


def test_comflp_search_defaults_to_the_measure_the_evidence_favours() -> None:
    from comflp.cli.search import EVIDENCE_MEASURE, search_parser

    assert search_parser().parse_args([]).select_measure == "dc"  # the paper's script keeps the paper's default
    assert search_parser(default_measure=EVIDENCE_MEASURE).parse_args([]).select_measure == "cosine"
    assert "measure-report" in search_parser().format_help()


def test_a_copy_of_the_measured_model_is_accepted_by_content_and_another_refused(tmp_path: Path, capsys) -> None:
    """A matrix names its model by path and by a content fingerprint: a copy elsewhere (here with another
    generation config) is the same model; the same config over other weights is not."""
    import shutil

    from safetensors.torch import load_file, save_file

    from comflp.cli import measure as analysis, search as search_cli

    from conftest import make_corpus, save_plain, tiny_model
    from test_bad_input import refused

    model = save_plain(tiny_model("wav2vec2-stable", seed=4), tmp_path / "model", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=8)
    matrix = tmp_path / "m.npz"
    analysis.measure_main(["--model", str(model), "--data_dir", str(corpus), "--measures", "cosine", "--batch_size",
                           "4", "--iter_num", "2", "--no_plot", "--quiet", "--dump_dir", str(tmp_path), "--output",
                           str(matrix)])
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    (copy / "generation_config.json").write_text('{"max_length": 7}')
    common = ["--measure_file", str(matrix), "--select_measure", "cosine", "--num_layers", "6", "--num_clip_layers",
              "2", "--verify_data_dir", str(corpus), "--test_num_batch", "1", "--verify_batch_size", "4", "--log_dir",
              str(tmp_path), "--quiet"]
    found = search_cli.search_main(["--model", str(copy), *common, "--output", str(tmp_path / "s.json")])
    assert len(found.candidates) == 10
    other = tmp_path / "other"
    shutil.copytree(model, other)
    weights = load_file(str(other / "model.safetensors"))
    name = "wav2vec2.encoder.layers.0.feed_forward.output_dense.bias"
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(search_cli.search_main, ["--model", str(other), *common, "--output", str(tmp_path / "o.json")], capsys,
            "weights or config differ")
    assert not (tmp_path / "o.json").exists()


def test_every_candidate_unusable_is_said_in_one_line(world, tmp_path: Path, capsys) -> None:
    """A random model's candidates are all broken (error rates over 90%): the search, GLP and measure-report say
    so, since a ranking among broken models means nothing."""
    from comflp.cli import measure as analysis, report as report_cli, search as search_cli

    _, model, corpus = world
    matrix = tmp_path / "m.npz"
    analysis.measure_main(["--model", str(model), "--data_dir", str(corpus), "--measures", "cosine,cka",
                           "--batch_size", "4", "--iter_num", "2", "--no_plot", "--quiet", "--dump_dir", str(tmp_path),
                           "--output", str(matrix)])
    verify = ["--model", str(model), "--num_layers", "6", "--num_clip_layers", "2", "--verify_data_dir", str(corpus),
              "--test_num_batch", "1", "--verify_batch_size", "8", "--log_dir", str(tmp_path), "--quiet"]
    capsys.readouterr()
    found = search_cli.main([*verify, "--measure_file", str(matrix), "--output", str(tmp_path / "s.json")])
    assert min(c.cer for c in found.candidates) >= 0.9
    line = "every candidate is unusable before healing (error rate >= 90%"
    assert found.meta["unusable"].startswith(line) and "consider removing fewer layers" in found.meta["unusable"]
    shown = capsys.readouterr().out
    assert line in shown and found.meta["error_rate"] == "CER" and "rank       score       CER" in shown
    glp = search_cli.glp_main([*verify, "--output", str(tmp_path / "g.json")])
    assert "unusable before healing" in glp.meta["unusable"]
    out = report_cli.main(["--model", str(model), "--measure_file", str(matrix), "--num_clip_layers", "2",
                           "--verify_data_dir", str(corpus), "--test_num_batch", "1", "--verify_batch_size", "8",
                           "--num_strategies", "5", "--bootstrap", "100", "--output", str(tmp_path / "r.json")])
    assert json.loads(Path(out).read_text())["all_unusable"] is True
