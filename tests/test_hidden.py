"""Capture and streamed statistics: streamed == in-memory, 2 processes == 1, the paper's DC recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dcor
import numpy as np
import pytest
import torch

from comflp import measures as M
from comflp.cli.measure import load_npz
from comflp.errors import ComflpError
from comflp.data import collate, read_corpus_dir
from comflp.hidden import MeasureSettings, capture_layer_states, collect, plan_bands, select_utterances

from comflp.model import call, forward, num_layers

from conftest import make_corpus, processor_for, run_comflp, save_plain, tiny_model, tiny_processor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hidden")
    corpus = make_corpus(tmp / "corpus", n=12)
    model = tiny_model("wav2vec2")
    model_dir = save_plain(model, tmp / "model", tmp / "proc")
    fe, _ = tiny_processor(tmp / "proc")
    return model, fe, read_corpus_dir(corpus), corpus, model_dir


def _in_memory(model, fe, utts, settings):
    """All states of the selected utterances, each run alone (batch of one: no padding), kept in memory.

    Running every utterance alone is the definition of batch-invariant capture.
    """
    chosen = select_utterances(utts, settings)
    pooled, frames = [], []
    with torch.no_grad(), capture_layer_states(model) as states:
        for utt in chosen:
            batch = collate([utt], fe)
            model(batch.inputs, attention_mask=batch.attention_mask)
            st = torch.stack(states).to(torch.float64)  # [L, 1, T, D]
            pooled.append(st.mean(2))  # [L, 1, D]: every frame is real
            frames.append(st[:, 0])  # [L, T, D]
    per_batch = [torch.cat(pooled[i: i + settings.batch_size], 1) for i in range(0, len(pooled), settings.batch_size)]
    return torch.cat(pooled, 1), torch.cat(frames, 1), per_batch


def _condition(x: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(M.covariance(x))
    return float(ev[-1] / ev[0].clamp(min=1e-300))


@pytest.mark.parametrize("mode", ["U", "T"])
def test_streamed_equals_in_memory(setup, mode: str) -> None:
    model, fe, utts, _, _ = setup
    settings = MeasureSettings(measures=("svcca", "cka", "cosine", "angular"), batch_size=3, iter_num=4,
                               sample_mode=mode, thre=0.99)
    got, stats = collect(model, fe, utts, settings, progress=False)
    pooled, frames, _ = _in_memory(model, fe, utts, settings)
    samples = pooled if mode == "U" else frames
    assert stats.count == samples.shape[1]
    n = samples.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            x, y = samples[i], samples[j]
            # the reference ran each utterance alone: float32 rounding of batched matmuls is all that differs
            assert got["svcca"][i, j] == pytest.approx(float(M.svcca(x, y, thre=0.99).mean()), abs=1e-6)
            assert got["cka"][i, j] == pytest.approx(M.linear_cka(x, y), abs=1e-6)
    torch.testing.assert_close(got["cosine"], M.cosine_matrix(samples), rtol=0, atol=1e-7)
    torch.testing.assert_close(got["angular"], M.angular_matrix(samples), rtol=0, atol=1e-7)  # arccos is steep near 1


def test_streamed_pwcca_equals_in_memory(setup) -> None:
    """PWCCA over frames, on a pre-LN model.

    A post-LN layer's outputs lie on a hyperplane (zero mean over features), so
    their covariance is singular, and google's PWCCA, which adds the means back
    to sign-ambiguous canonical directions, then moves by 1e-3 under 1e-12
    relative noise. Pre-LN residual states are well conditioned.
    """
    _, fe, utts, _, _ = setup
    model = tiny_model("wav2vec2-stable", seed=3)
    settings = MeasureSettings(measures=("pwcca",), batch_size=3, iter_num=4, sample_mode="T")
    got, _ = collect(model, fe, utts, settings, progress=False)
    _, frames, _ = _in_memory(model, fe, utts, settings)
    assert max(_condition(f) for f in frames) < 1e8
    for i in range(frames.shape[0]):
        for j in range(i + 1, frames.shape[0]):
            assert got["pwcca"][i, j] == pytest.approx(M.pwcca(frames[i], frames[j]), abs=1e-6)


@pytest.mark.parametrize("mode", ["T", "U"])
def test_banded_moment_equals_the_whole_moment(setup, tmp_path, mode: str) -> None:
    """A moment too big for its memory budget is built one layer band per pass: the same matrices.

    Mode T's frames (about 10,000) do not fit in the budget, so every pass runs the model again; mode U's
    40 pooled utterances do, so the later passes add the first pass's samples again and the model runs once.
    """
    _, fe, utts, _, _ = setup
    if mode == "U":  # PWCCA needs more distinct utterances than the 32 features
        utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=40, seconds=0.6))
    model = tiny_model("wav2vec2-stable", seed=3)
    settings = MeasureSettings(measures=("svcca", "pwcca", "cka", "cosine"), batch_size=3 if mode == "T" else 4,
                               iter_num=4 if mode == "T" else 10, sample_mode=mode)
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    dims = [model.config.hidden_size] * (model.config.num_hidden_layers + 1)
    budget = 8 * 2 * dims[0] * sum(dims) / 2**30  # two layers' rows against every column: several bands
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the pairs on two worker threads (the forward on two threads in both runs)
    try:
        whole, _ = collect(model, fe, utts, settings, progress=False)
        single_pass = calls[0]
        calls[0] = 0
        banded, stats = collect(model, fe, utts, settings, progress=False, moment_memory_gb=budget)
    finally:
        torch.set_num_threads(threads)
    handle.remove()
    passes = len(plan_bands(dims, budget * 2**30))
    assert passes >= 3 and calls[0] == (passes if mode == "T" else 1) * single_pass
    for name in settings.measures:
        torch.testing.assert_close(banded[name], whole[name], rtol=0, atol=1e-8, msg=name)
    assert stats.moment is None  # freed
    if mode == "U":
        return
    _, frames, _ = _in_memory(model, fe, utts, settings)  # and both equal the in-memory computation
    for i, j in [(0, 1), (0, len(dims) - 1), (2, 4)]:
        assert banded["svcca"][i, j] == pytest.approx(float(M.svcca(frames[i], frames[j]).mean()), abs=1e-6)
        assert banded["pwcca"][i, j] == pytest.approx(M.pwcca(frames[i], frames[j]), abs=1e-6)
        assert banded["cka"][i, j] == pytest.approx(M.linear_cka(frames[i], frames[j]), abs=1e-6)


def test_pwcca_over_too_few_utterances_is_refused(setup) -> None:
    model, fe, utts, _, _ = setup
    settings = MeasureSettings(measures=("pwcca",), batch_size=3, iter_num=4, sample_mode="U")
    with pytest.raises(ComflpError, match="pwcca needs at least as many samples"):
        collect(model, fe, utts, settings, progress=False)


def test_dc_is_the_mean_over_batches_of_dcor_on_pooled_normalised_vectors(setup) -> None:
    model, fe, utts, _, _ = setup
    settings = MeasureSettings(measures=("dc", "dc_unbiased"), batch_size=4, iter_num=3)
    got, stats = collect(model, fe, utts, settings, progress=False)
    assert stats.num_batches == 3
    _, _, per_batch = _in_memory(model, fe, utts, settings)
    unit = [torch.nn.functional.normalize(p, dim=-1).numpy() for p in per_batch]
    ref = np.mean([dcor.distance_correlation_sqr(u[2], u[6]) for u in unit])
    ref_u = np.mean([dcor.u_distance_correlation_sqr(u[2], u[6]) for u in unit])
    assert got["dc"][2, 6] == pytest.approx(ref, abs=1e-6)
    # the paper's epsilons (1e-12 in the distance, 1e-9 in the denominator) weigh more on 4 samples
    assert got["dc_unbiased"][2, 6] == pytest.approx(ref_u, abs=1e-5)


def test_same_seed_same_matrix_other_seed_other_sample(setup) -> None:
    model, fe, utts, _, _ = setup
    s = MeasureSettings(measures=("dc",), batch_size=2, iter_num=3, seed=5)
    a, _ = collect(model, fe, utts, s, progress=False)
    b, _ = collect(model, fe, utts, s, progress=False)
    assert torch.equal(a["dc"], b["dc"])
    other = MeasureSettings(measures=("dc",), batch_size=2, iter_num=3, seed=6)
    assert select_utterances(utts, s) != select_utterances(utts, other)


def test_padding_is_ignored_unless_asked(setup) -> None:
    model, fe, utts, _, _ = setup
    base = dict(measures=("cosine",), batch_size=4, iter_num=2)
    masked, _ = collect(model, fe, utts, MeasureSettings(**base), progress=False)
    paper, _ = collect(model, fe, utts, MeasureSettings(**base, pool_padding=True), progress=False)
    assert not torch.allclose(masked["cosine"], paper["cosine"])


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_two_processes_equal_one(setup, tmp_path: Path) -> None:
    _, _, _, corpus, model_dir = setup
    args = ["--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", "2", "--iter_num", "4",
            "--measures", "dc,svcca,cka,cosine", "--svcca_mode", "T", "--no_plot", "--quiet"]
    # the two processes also build the moment in bands (3 passes), all-reducing each band
    banded = ["--moment_memory_gb", str(8 * 2 * 32 * 7 * 32 / 2**30)]
    # one process, in this one, on one thread as each of the two below (OMP_NUM_THREADS=1)
    one = run_comflp("measure", *args, "--threads", "1", "--dump_dir", str(tmp_path / "one"),
                     "--output", str(tmp_path / "one.npz"), cwd=REPO)
    assert one.returncode == 0, one.stderr
    accelerate = Path(sys.executable).parent / "accelerate"
    # accelerate's torchrun route; on a CPU-only machine comflp makes it gloo on the CPU
    two = _run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "comflp", "measure", *args, *banded,
                "--dump_dir", str(tmp_path / "two"), "--output", str(tmp_path / "two.npz")])
    assert two.returncode == 0, two.stderr[-3000:]
    m1, meta1 = load_npz(tmp_path / "one.npz")
    m2, meta2 = load_npz(tmp_path / "two.npz")
    assert meta2["processes"] == 2 and meta1["processes"] == 1
    assert meta1["num_frames"] == meta2["num_frames"] and meta1["num_utterances"] == meta2["num_utterances"] == 8
    for name in m1:
        np.testing.assert_allclose(m2[name], m1[name], rtol=0, atol=1e-9, err_msg=name)


def test_measure_npz_records_settings(setup, tmp_path: Path) -> None:
    _, _, _, corpus, model_dir = setup
    out = run_comflp("measure", "--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", "4",
                     "--iter_num", "2", "--measures", "dc,pwcca,angular", "--svcca_mode", "T",
                     "--dump_dir", str(tmp_path), "--figure_dir", str(tmp_path), "--quiet", cwd=REPO)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    mats, meta = load_npz(path)
    assert set(mats) == {"dc", "pwcca", "angular"} and mats["dc"].shape == (7, 7)
    assert meta["settings"]["batch_size"] == 4 and meta["num_utterances"] == 8
    assert {p.name for p in tmp_path.glob("*.png")} == {f"{path.stem}_{m}.png" for m in mats}


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm", "data2vec-audio", "unispeech-sat", "wav2vec2-conformer", "sew",
                                    "sew-d", "wav2vec2-bert", "parakeet_ctc", "lasr_ctc"])
def test_layer_frame_mask_counts_the_frames_each_utterance_has_alone(setup, family: str, tmp_path: Path) -> None:
    """Hidden state 0 is the input of layer 1, captured at the layers' frame rate (SEW pools first)."""
    from comflp.model import layer_frame_mask

    _, _, utts, _, _ = setup
    model = tiny_model(family, seed=1)
    fe, _ = processor_for(model, tmp_path)
    alone, alone_states = [], []
    with torch.no_grad(), capture_layer_states(model) as states:
        for u in utts[:4]:
            b = collate([u], fe)
            call(model, b.inputs, b.attention_mask)
            real = int(layer_frame_mask(model, b.attention_mask, states[0].shape[1]).sum())
            # every frame of an utterance alone is real, except at times Parakeet's last (from a partial log-mel
            # window, which its own attention mask leaves out)
            assert states[0].shape[1] - real in ((0, 1) if family == "parakeet_ctc" else (0,))
            alone.append(real)
            alone_states.append([s[0, :real] for s in states])
            assert len(states) == num_layers(model) + 1
        batch = collate(utts[:4], fe)
        forward(model, batch.inputs, batch.attention_mask)
        mask = layer_frame_mask(model, batch.attention_mask, states[0].shape[1])
    assert mask.sum(-1).tolist() == alone and len(set(alone)) > 1
    for i, per_layer in enumerate(alone_states):  # hidden state 0 (the input of layer 1) and the rest, batch-invariant
        for got, want in zip(states, per_layer):
            torch.testing.assert_close(got[i, : alone[i]], want, rtol=1e-4, atol=1e-5)
