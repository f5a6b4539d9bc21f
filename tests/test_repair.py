"""Repair at the cut: the fold is exact, the fit is least squares, calibration is batch-invariant, bad input
is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq

from comflp import repair as R
from comflp.artifacts import REPAIR_FILE
from comflp.cli import model as cli
from comflp.data import collate, read_corpus_dir
from comflp.errors import ComflpError
from comflp.hidden import capture_layer_states, forward_stack
from comflp.model import LoadedModel, call, run_layers, skip_layers, stack_layers
from comflp.stages import prune, repair

from conftest import FAMILIES, make_corpus, processor_for, save_plain, tiny_model, write_wav
from test_whisper import WHISPER_VOCAB, _whisper_dir

PRE_LN = ("wav2vec2-stable",)
NO_FOLD = ("lasr_ctc",)  # its layers end in a LayerNorm without a bias: an affine map's shift cannot fold
AFFINE_PRUNED = [1, 3, 4]  # a cut at the first layer (state 0) and one inside
LINEAR_PRUNED = [2, 3, 5]


@pytest.fixture(scope="module")
def utts(tmp_path_factory):
    return read_corpus_dir(make_corpus(tmp_path_factory.mktemp("calib") / "corpus", n=8))


def _loaded(model, tmp: Path) -> LoadedModel:
    fe, tok = processor_for(model, tmp / "proc")
    return LoadedModel(model, fe, tok, "tiny")


def test_a_layer_norm_without_a_bias_is_refused_in_one_line(utts, tmp_path: Path) -> None:
    loaded = _loaded(tiny_model("lasr_ctc", seed=3), tmp_path)
    with pytest.raises(ComflpError, match="LayerNorm without a bias .*--repair none"):
        repair(loaded, utts, layers=AFFINE_PRUNED, kind="affine")


@pytest.mark.parametrize("family,kind", [(f, "affine") for f in FAMILIES if f not in NO_FOLD]
                         + [(f, "linear") for f in PRE_LN])
def test_reloaded_repaired_checkpoint_equals_the_map_applied_as_a_module(family: str, kind: str, utts,
                                                                        tmp_path: Path) -> None:
    model = tiny_model(family, seed=3)
    loaded = _loaded(model, tmp_path)
    pruned = LINEAR_PRUNED if kind == "linear" else AFFINE_PRUNED
    fitted = repair(loaded, utts, layers=pruned, kind=kind)
    assert fitted.maps, "at least one cut folds"
    out = prune(loaded, pruned, tmp_path / "out", repair=fitted).path
    reloaded = AutoModelForCTC.from_pretrained(out).eval()  # plain transformers, no comflp code
    batch = collate(utts[:3], loaded.feature_extractor)
    with torch.no_grad(), R.applied(model, fitted), skip_layers(model, pruned):
        reference = call(model, batch.inputs, batch.attention_mask).logits
    with torch.no_grad():
        got = call(reloaded, batch.inputs, batch.attention_mask).logits
        with skip_layers(model, pruned):
            unrepaired = call(model, batch.inputs, batch.attention_mask).logits
    assert torch.allclose(got, reference, atol=1e-5)
    assert not torch.allclose(got, unrepaired, atol=1e-4)  # the map did something
    record = json.loads((out / REPAIR_FILE).read_text())
    assert record["kind"] == kind and record["written_by"] == "comflp"
    assert sorted(c["block"][0] for c in record["cuts"]) == [a for a, _ in R.to_blocks(pruned)]


@pytest.mark.parametrize("stack,kind", [("encoder", "linear"), ("decoder", "linear"), ("decoder", "affine")])
def test_whisper_repair_folds_exactly_in_either_stack(stack: str, kind: str, tmp_path: Path) -> None:
    from comflp.model import load_model

    texts = ["".join(WHISPER_VOCAB[4 + (i + j) % 9] for j in range(3 + i % 3)) for i in range(8)]
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=8, texts=texts))
    loaded = load_model(_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    model = loaded.model
    pruned = [2, 3]
    plan = {"layers": pruned} if stack == "encoder" else {"decoder_layers": pruned}
    fitted = repair(loaded, utts, kind=kind, **plan)
    assert [m.cut.block for m in fitted.maps] == [(2, 3)]
    out = prune(loaded, plan.get("layers", []), tmp_path / "out", decoder_layers=plan.get("decoder_layers", []),
                repair=fitted).path
    reloaded = AutoModelForSpeechSeq2Seq.from_pretrained(out).eval()
    batch = collate(utts[:3], loaded.feature_extractor)
    tokens = torch.tensor([[1, 5, 9, 12], [1, 7, 6, 11], [1, 4, 8, 10]])
    kept = [0, 3]
    with torch.no_grad(), R.applied(model, fitted), run_layers(model, kept, stack):
        reference = model(input_features=batch.inputs, decoder_input_ids=tokens).logits
    with torch.no_grad():
        got = reloaded(input_features=batch.inputs, decoder_input_ids=tokens).logits
    assert torch.allclose(got, reference, atol=1e-5)


def _activations(model, fe, utts, cut: R.Cut, site_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Every real frame's (x, y) of ``cut``, kept in memory (the reference the streamed sums must match)."""
    xs, ys = [], []
    ffn = {}
    layer = stack_layers(model)[cut.start - 1]
    handle = layer.feed_forward.output_dense.register_forward_hook(lambda m, a, o: ffn.__setitem__(0, o))
    try:
        with torch.no_grad(), capture_layer_states(model) as states:
            for u in utts:
                batch = collate([u], fe)
                mask = forward_stack(model, batch, states).reshape(-1)
                before = states[cut.start].reshape(-1, states[0].shape[-1])[mask].double()
                after = states[cut.end].reshape(-1, states[0].shape[-1])[mask].double()
                if site_kind == "ffn":
                    f = ffn[0].reshape(-1, ffn[0].shape[-1])[mask].double()
                    xs.append(f)
                    ys.append(after - before + f)
                else:
                    xs.append(before)
                    ys.append(after)
    finally:
        handle.remove()
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


@pytest.mark.parametrize("family,kind", [("wav2vec2-stable", "linear"), ("wav2vec2-stable", "affine"),
                                         ("wav2vec2", "affine")])
def test_fit_equals_numpy_lstsq_on_the_same_activations(family: str, kind: str, utts, tmp_path: Path) -> None:
    model = tiny_model(family, seed=1)
    fe, _ = processor_for(model, tmp_path)
    cut = R.Cut("encoder", 2, 4)
    stats = R.collect(model, fe, utts, [cut], kind, batch_size=1, progress=False)[cut]
    scale, shift, r2, r2_before = R.fit(stats, ridge=0.0)
    site = R.fold_site(model, cut)
    x, y = _activations(model, fe, utts, cut, site.kind)
    assert stats.count == len(x)
    ones = np.ones((len(x), 1))
    if kind == "linear":
        solution = np.linalg.lstsq(np.hstack([x, ones]), y, rcond=None)[0]
        expected_scale, expected_shift = solution[:-1], solution[-1]
    else:
        per_channel = [np.linalg.lstsq(np.hstack([x[:, [d]], ones]), y[:, d], rcond=None)[0] for d in range(x.shape[1])]
        expected_scale, expected_shift = np.array([p[0] for p in per_channel]), np.array([p[1] for p in per_channel])
    # the normal equations square the inputs' condition number, lstsq (QR) does not: the coefficients agree to
    # what float32 activations carry, the fitted states to float64 rounding
    np.testing.assert_allclose(scale.numpy(), expected_scale, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shift.numpy(), expected_shift, rtol=1e-4, atol=1e-5)
    fitted = x @ scale.numpy() + shift.numpy() if kind == "linear" else x * scale.numpy() + shift.numpy()
    reference = x @ expected_scale + expected_shift if kind == "linear" else x * expected_scale + expected_shift
    np.testing.assert_allclose(fitted, reference, rtol=1e-7, atol=1e-7)
    # R² of the state after the cut against h_j: its error is the error in y in both layer kinds
    predicted = x @ expected_scale + expected_shift if kind == "linear" else x * expected_scale + expected_shift
    after = _activations_after(model, fe, utts, cut)
    sse = ((predicted - y) ** 2).sum()
    assert r2 == pytest.approx(1 - sse / ((after - after.mean(0)) ** 2).sum(), rel=1e-6)
    before = _activations_after(model, fe, utts, R.Cut("encoder", cut.start, cut.start))
    assert r2_before == pytest.approx(1 - ((after - before) ** 2).sum() / ((after - after.mean(0)) ** 2).sum(),
                                       rel=1e-6)


def _activations_after(model, fe, utts, cut: R.Cut) -> np.ndarray:
    """Every real frame of hidden state ``cut.end``."""
    rows = []
    with torch.no_grad(), capture_layer_states(model) as states:
        for u in utts:
            batch = collate([u], fe)
            mask = forward_stack(model, batch, states).reshape(-1)
            rows.append(states[cut.end].reshape(-1, states[0].shape[-1])[mask].double())
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("family,kind", [("wav2vec2", "affine"), ("wav2vec2-stable", "linear")])
def test_calibration_does_not_depend_on_the_batch_size(family: str, kind: str, utts, tmp_path: Path) -> None:
    model = tiny_model(family, seed=4)
    fe, _ = processor_for(model, tmp_path)
    cuts = R.cuts_of([2, 3, 5], 6)
    fits = []
    for batch_size in (1, 3, 8):
        stats = R.collect(model, fe, utts, cuts, kind, batch_size=batch_size, progress=False)
        fits.append(R.fit_all(model, stats, cuts, kind))
    for other in fits[1:]:
        for a, b in zip(fits[0].maps, other.maps):
            assert a.frames == b.frames
            # the states agree to float32 rounding (1e-6), which a full map's fit amplifies by the inputs'
            # condition number: the coefficients agree to 1e-5, R² to 1e-6
            torch.testing.assert_close(a.scale, b.scale, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.shift, b.shift, rtol=1e-4, atol=1e-5)
            assert a.r2 == pytest.approx(b.r2, abs=1e-6)


def test_a_cut_at_the_first_layer_of_a_pre_ln_stack_is_left_unrepaired_and_said(utts, tmp_path: Path) -> None:
    loaded = _loaded(tiny_model("wav2vec2-stable"), tmp_path)
    fitted = repair(loaded, utts, layers=[1, 2, 4], kind="linear")
    assert [s.cut.block for s in fitted.skipped] == [(1, 2)]
    assert [m.cut.block for m in fitted.maps] == [(4, 4)]
    assert {"stack": "encoder", "block": [1, 2], "site": None} == {
        k: v for k, v in fitted.record()["cuts"][-1].items() if k != "skipped"}


# ---------------------------------------------------------------------------------------------------------
# the command line and its refusals


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repair_cli")
    return (tmp, save_plain(tiny_model("wav2vec2", seed=2), tmp / "post", tmp / "p1"),
            save_plain(tiny_model("wav2vec2-stable", seed=2, intermediate_size=16), tmp / "narrow", tmp / "p2"),
            make_corpus(tmp / "corpus", n=8))


def _prune(*args: str) -> None:
    cli.prune_main(["--quiet", *args])


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _prune(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # transformers' loading bar aside
    assert len(lines) == 1, err
    return lines[0]


def test_comflp_prune_repair_writes_a_plain_checkpoint_and_says_the_fit(dirs, capsys) -> None:
    tmp, post, _, corpus = dirs
    _prune("--model", str(post), "--layers", "2,3", "--repair", "affine", "--calib_data_dir", str(corpus),
           "--output", str(tmp / "repaired"))
    out = capsys.readouterr().out
    assert "repaired encoder block [2, 3] at encoder layer 1 final_layer_norm: R²" in out
    record = json.loads((tmp / "repaired" / REPAIR_FILE).read_text())
    assert record["calibration"]["utterances"] == 8 and record["cuts"][0]["frames"] > 0
    assert AutoModelForCTC.from_pretrained(tmp / "repaired").config.num_hidden_layers == 4


def test_linear_on_a_post_ln_model_is_refused_naming_affine(dirs, capsys) -> None:
    tmp, post, _, corpus = dirs
    err = _refused(capsys, "--model", str(post), "--layers", "2,3", "--repair", "linear", "--calib_data_dir",
                   str(corpus), "--output", str(tmp / "x1"))
    assert "--repair affine" in err and "post-LN" in err
    assert not (tmp / "x1").exists()


def test_too_few_calibration_frames_for_a_linear_map_are_refused(dirs, capsys) -> None:
    tmp, _, narrow, _ = dirs
    short = tmp / "short"  # one 30-ms clip: 23 frames for a 32-wide model
    write_wav(short / "a.wav", 0.03)
    (short / "wav.scp").write_text("a a.wav\n")
    err = _refused(capsys, "--model", str(narrow), "--layers", "3", "--repair", "linear", "--calib_data_dir",
                   str(short), "--output", str(tmp / "x2"))
    assert "23 calibration frame(s) for a 32 x 32 map" in err and "--calib_utts" in err
    assert not (tmp / "x2").exists()


def test_a_singular_fit_without_ridge_is_refused(dirs, capsys) -> None:
    # the feed-forward is 16 wide, so its 32-wide output spans 16 dimensions: the map is not unique
    tmp, _, narrow, corpus = dirs
    err = _refused(capsys, "--model", str(narrow), "--layers", "3", "--repair", "linear", "--calib_data_dir",
                   str(corpus), "--repair_ridge", "0", "--output", str(tmp / "x3"))
    assert "--repair_ridge > 0" in err
    _prune("--model", str(narrow), "--layers", "3", "--repair", "linear", "--calib_data_dir", str(corpus),
           "--output", str(tmp / "x3"))  # the default ridge fits it
    assert (tmp / "x3" / REPAIR_FILE).exists()


def test_calibration_flags_without_a_repair_are_refused(dirs, capsys) -> None:
    tmp, post, _, corpus = dirs
    err = _refused(capsys, "--model", str(post), "--layers", "2", "--calib_utts", "4", "--output", str(tmp / "x4"))
    assert "--calib_utts" in err and "--repair" in err


def test_a_repair_fitted_for_other_layers_is_refused(utts, tmp_path: Path) -> None:
    loaded = _loaded(tiny_model("wav2vec2"), tmp_path)
    fitted = repair(loaded, utts, layers=[2, 3], kind="affine")
    with pytest.raises(ComflpError, match="fitted for other layers"):
        prune(loaded, [2, 4], tmp_path / "out", repair=fitted)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# the fine search ranks candidates after their repair


@pytest.mark.parametrize("family,kind", [("wav2vec2", "affine"), ("wav2vec2-stable", "linear")])
def test_fine_search_after_repair_equals_each_repaired_model_built_alone(family: str, kind: str, utts,
                                                                        tmp_path: Path) -> None:
    from comflp.heads import decode_batch
    from comflp.model import prune as prune_model
    from comflp.verify import FineSearch

    model = tiny_model(family, seed=6)
    loaded = _loaded(model, tmp_path)
    # shared prefixes, a shared layer followed by different cuts, a cut at layer 1 and one to the end
    sets = [[2, 3], [2, 4], [2, 3, 6], [1, 5], [3], [5, 6]]
    fitted = repair(loaded, utts, candidates=sets, kind=kind)
    engine = FineSearch(loaded, utts, batch_size=3, progress=False, repair=fitted)
    for pruned, hyps in zip(sets, engine.transcribe(sets)):
        alone = prune_model(model, pruned)
        R.fold(alone, fitted.select(R.cuts_of(pruned, 6)),
               kept={"encoder": [i for i in range(6) if i + 1 not in pruned]})
        expected = {}
        with torch.inference_mode():
            for k in range(0, len(utts), 2):
                batch = collate(utts[k: k + 2], loaded.feature_extractor)
                expected.update(zip(batch.utt_ids, decode_batch(alone, loaded.tokenizer, batch)))
        assert hyps == [expected[u.utt_id] for u in utts], pruned


def test_search_with_repair_records_it_and_refuses_without_a_fine_search(tmp_path: Path, capsys) -> None:
    from comflp.cli import measure, search

    model = save_plain(tiny_model("wav2vec2-stable", seed=2), tmp_path / "model", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=8)
    measure.measure_main(["--model", str(model), "--data_dir", str(corpus), "--measures", "cosine", "--batch_size",
                          "4", "--iter_num", "2", "--no_plot", "--quiet", "--output", str(tmp_path / "m.npz")])
    common = ["--model", str(model), "--measure_file", str(tmp_path / "m.npz"), "--num_layers", "6",
              "--num_clip_layers", "2", "--topk_num", "4", "--verify_data_dir", str(corpus), "--quiet"]
    strategy = search.main([*common, "--repair", "linear", "--calib_data_dir", str(corpus),
                            "--output", str(tmp_path / "s.json")])
    assert strategy.meta["repair"]["kind"] == "linear"
    assert {tuple(c["block"]) for c in strategy.meta["repair"]["cuts"]} == {
        b for c in strategy.candidates for b in c.blocks}
    capsys.readouterr()
    _prune("--model", str(model), "--strategy", str(tmp_path / "s.json"), "--output", str(tmp_path / "unrepaired"))
    assert "ranked its candidates after --repair linear; this prune uses --repair none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search.main([*common, "--repair", "affine", "--coarse_search_only", "true", "--output",
                     str(tmp_path / "s2.json")])
    assert "--repair ranks the candidates of the fine search" in capsys.readouterr().err
    assert not (tmp_path / "s2.json").exists()


def test_healing_starts_from_the_repaired_model_and_records_it(tmp_path: Path) -> None:
    from comflp import finetune
    from comflp.model import load_model

    model_dir = save_plain(tiny_model("wav2vec2-stable", seed=2), tmp_path / "model", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=8)
    config = finetune.FinetuneConfig(model=str(model_dir), layers="2,3", repair="linear", train_data_dir=corpus,
                                     valid_data_dir=corpus, calib_utts=6, quiet=True)
    student = finetune._student_and_teacher(config, "cpu")[0].model
    loaded = load_model(model_dir, need_tokenizer=True)
    chosen = R.calibration_subset(read_corpus_dir(corpus), 6, 0)
    expected = prune(loaded, [2, 3], tmp_path / "repaired", repair=repair(loaded, chosen, layers=[2, 3],
                                                                          kind="linear")).path
    reference = AutoModelForCTC.from_pretrained(expected).state_dict()
    got = student.state_dict()
    assert set(got) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    settings = finetune.run_settings(config, [2, 3])
    assert settings["repair"] == "linear" and settings["calib_utts"] == 6
    assert "repair" not in finetune.run_settings(finetune.FinetuneConfig(layers="2,3"), [2, 3])  # old runs resume
