"""Fine-tuning: resume after SIGKILL, 2 processes == 1, distillation, averaging, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comflp.average import average_state_dicts
from comflp.cli import average as average_cli, finetune as finetune_cli
from comflp.finetune import distillation_loss
from comflp.strategy import Candidate, StrategyFile

from conftest import make_corpus, run_main, save_plain, tiny_model

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    model = save_plain(tiny_model("wav2vec2-stable", seed=1), tmp / "model", tmp / "proc")
    corpus = make_corpus(tmp / "corpus", n=12)
    return model, corpus


def _args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--layers", "2,4", "--batch_size", "2", "--grad_accum", "2", "--epochs", "2",
            "--lr", "1e-3", "--test_num_batch", "1", "--valid_batch_size", "4", "--train_data_dir", str(corpus),
            "--valid_data_dir", str(corpus), "--output_dir", str(out), "--threads", "1", "--quiet", *extra]


def _train(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``clip_finetune_train.py`` with ``args``: in this process, or in a subprocess under a ``launcher`` (such as
    accelerate's)."""
    if launcher is None:
        return run_main(finetune_cli.main, *args)
    cmd = launcher + [str(REPO / "clip_finetune_train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_resume_after_sigkill_gives_identical_weights(setup, tmp_path: Path) -> None:
    model, corpus = setup
    ref = _train(_args(model, corpus, tmp_path / "ref", "--checkpoint_every", "1"))  # in process: the same weights
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "clip_finetune_train.py"),
                             *_args(model, corpus, out, "--checkpoint_every", "1")],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    position = out / "last" / "position.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if position.exists() and json.loads(position.read_text())["update"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(position.read_text())["update"]
    assert 2 <= killed_at < 6 and not (out / "final").exists()  # killed before the end (6 updates)
    resumed = _train(_args(model, corpus, out, "--checkpoint_every", "1"))  # in process too
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # epoch 0: the pruned model before fine-tuning
    assert rows[0]["train_loss"] is None and 0 <= rows[0]["source_valid_cer"] and rows[0]["valid_cer"] >= 0
    ref_rows = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    for a_row, b_row in zip(ref_rows, rows):  # the resumed epoch's loss covers the whole epoch
        assert a_row["train_loss"] == pytest.approx(b_row["train_loss"]) if a_row["train_loss"] else True
    assert "----EPOCH: 2, Test wer :" in (out / "train.log").read_text()


def test_two_processes_match_one(setup, tmp_path: Path) -> None:
    model, corpus = setup
    one = _train(_args(model, corpus, tmp_path / "one", "--epochs", "1"))
    assert one.returncode == 0, one.stderr
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = _train(_args(model, corpus, tmp_path / "two", "--epochs", "1"), launcher=accelerate)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    start = load_file(str(model / "model.safetensors"))
    assert not torch.equal(a["lm_head.weight"], start["lm_head.weight"])  # training moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_distillation_loss_is_zero_for_identical_logits() -> None:
    logits = torch.randn(2, 7, 12)
    mask = torch.ones(2, 7, dtype=torch.bool)
    assert float(distillation_loss(logits, logits.clone(), mask, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, torch.randn(2, 7, 12), mask)) > 0.01
    mask[:, 5:] = False  # padded frames do not count
    noisy = logits.clone()
    noisy[:, 5:] += 10 * torch.randn(2, 2, 12)
    assert float(distillation_loss(logits, noisy, mask)) == pytest.approx(0.0, abs=1e-6)


def test_average_known_tensors(tmp_path: Path) -> None:
    sds = [{"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(3)},
           {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor(7)}]
    avg = average_state_dicts(sds)
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0]))
    assert avg["h"].dtype == torch.float16 and float(avg["h"]) == 1.5
    assert int(avg["n"]) == 7  # integer buffers: the newest
    exp = tmp_path / "exp"
    for e, sd in enumerate(sds, 1):
        (exp / f"epoch{e}").mkdir(parents=True)
        save_file(sd, str(exp / f"epoch{e}" / "model.safetensors"))
        (exp / f"epoch{e}" / "config.json").write_text("{}")
    (exp / "metrics.jsonl").write_text('{"epoch": 1, "valid_cer": 0.2}\n{"epoch": 2, "valid_cer": 0.3}\n')
    out = run_main(average_cli.main, "--exp_dir", str(exp), "--num", "2", "--mode", "last")
    assert out.returncode == 0, out.stderr
    got = load_file(str(exp / "model_avg" / "model.safetensors"))
    assert torch.equal(got["w"], torch.tensor([2.0, 4.0])) and (exp / "model_avg" / "config.json").exists()
    again = run_main(average_cli.main, "--exp_dir", str(exp), "--num", "1")
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    best = run_main(average_cli.main, "--exp_dir", str(exp), "--num", "1", "--overwrite")
    assert best.returncode == 0 and json.loads((exp / "model_avg" / "averaged_epochs.json").read_text())["epochs"] == [1]
    missing = run_main(average_cli.main, "--exp_dir", str(exp), "--last_epoch", "3", "--num", "2", "--mode", "last")
    assert missing.returncode == 2 and "epoch 3 not found" in missing.stderr and "Traceback" not in missing.stderr


def test_bad_inputs(setup, tmp_path: Path) -> None:
    model, corpus = setup
    StrategyFile(12, [Candidate([1, 2])]).save(tmp_path / "s12.json")
    args = _args(model, corpus, tmp_path / "x")
    i = args.index("--layers")
    wrong_depth = _train(args[:i] + ["--strategy", str(tmp_path / "s12.json")] + args[i + 2:])
    assert wrong_depth.returncode == 2 and "12-layer" in wrong_depth.stderr and "Traceback" not in wrong_depth.stderr
    missing = _train(_args(model, corpus, tmp_path / "y", "--resume_epoch", "5"))
    assert missing.returncode == 2 and "epoch5" in missing.stderr and "not found" in missing.stderr
    clip = _train(_args(model, corpus, tmp_path / "z", "--num_clip_layers", "3"))
    assert clip.returncode == 2 and "--num_clip_layers 3" in clip.stderr


def test_resume_only_the_same_experiment(setup, tmp_path: Path) -> None:
    model, corpus = setup
    out = tmp_path / "exp"
    first = _train(_args(model, corpus, out, "--epochs", "1"))
    assert first.returncode == 0, first.stderr
    weights = _weights(out)
    for layers in ("1,3", "1,3,5"):  # same K, then another K
        args = _args(model, corpus, out, "--epochs", "1")
        args[args.index("--layers") + 1] = layers
        other = _train(args)
        assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr
        line = other.stderr.strip().splitlines()[-1]
        assert line.startswith("error:") and "pruned: [2, 4] there" in line and "--overwrite" in line
    lr = _train(_args(model, corpus, out, "--epochs", "1", "--lr", "5e-4"))
    assert lr.returncode == 2 and "lr: 0.001 there, 0.0005 now" in lr.stderr
    for k, v in _weights(out).items():  # nothing was touched by the refused runs
        assert torch.equal(v, weights[k]), k
    afresh = _train(_args(model, corpus, out, "--epochs", "1", "--lr", "5e-4", "--overwrite"))
    assert afresh.returncode == 0, afresh.stderr
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 5e-4


def test_refuses_a_dir_it_did_not_write(setup, tmp_path: Path) -> None:
    model, corpus = setup
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("keep me")
    run = _train(_args(model, corpus, out, "--epochs", "1", "--overwrite"))
    assert run.returncode == 2 and "not written by comflp" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data.csv"] and (out / "data.csv").read_text() == "keep me"


def test_a_dataset_trains_as_its_kaldi_dir(setup, tmp_path: Path) -> None:
    """--dataset (train and validation splits) gives the weights the same utterances give from Kaldi dirs."""
    import datasets

    from comflp.data import read_corpus_dir

    model, corpus = setup
    utts = read_corpus_dir(corpus)

    def split(rows):
        return datasets.Dataset.from_dict({"audio": [str(u.path) for u in rows], "text": [u.text for u in rows],
                                           "id": [u.utt_id for u in rows]}).cast_column("audio", datasets.Audio())

    datasets.DatasetDict({"train": split(utts), "validation": split(utts)}).save_to_disk(str(tmp_path / "ds"))
    kaldi = _train(_args(model, corpus, tmp_path / "kaldi"))
    kaldi_flags = _args(model, corpus, tmp_path / "hf")
    for flag in ("--train_data_dir", "--valid_data_dir"):  # a dataset replaces them (giving both is refused)
        i = kaldi_flags.index(flag)
        del kaldi_flags[i: i + 2]
    hf = _train(kaldi_flags + ["--dataset", str(tmp_path / "ds")])
    assert kaldi.returncode == 0 and hf.returncode == 0, kaldi.stderr + hf.stderr
    a, b = _weights(tmp_path / "kaldi"), _weights(tmp_path / "hf")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    run = json.loads((tmp_path / "hf" / "run.json").read_text())["settings"]
    assert run["dataset"] == str((tmp_path / "ds").resolve()) and "train_data_dir" not in run


def test_labels_keep_word_boundaries_of_text_in_words_and_drop_aishell_spaces(tmp_path: Path) -> None:
    from transformers import Wav2Vec2CTCTokenizer

    from comflp.heads import CtcHead

    _labels = CtcHead().labels

    from conftest import parakeet_tokenizer

    vocab = ["<pad>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz", "你", "好", "世", "界"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    tok = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), word_delimiter_token="|", bos_token=None, eos_token=None)
    english, chinese = _labels(None, tok, ["hi you", "你好 世界"]).tolist()
    assert english[:6] == [vocab.index(c) for c in "hi|you"]
    assert chinese[:4] == [vocab.index(c) for c in "你好世界"] and chinese[4:] == [-100, -100]
    # Parakeet's SentencePiece vocabulary marks word starts with "▁"; AISHELL-style spaces are dropped first
    pk = parakeet_tokenizer()
    assert pk.convert_ids_to_tokens(_labels(None, pk, ["你好 世界"])[0].tolist()) == ["▁", "你", "好", "世", "界"]


def test_merged_lora_equals_the_adapted_model() -> None:
    """LoRA on every linear layer of both Whisper stacks: the adapted model starts equal to the source (B = 0);
    with trained (here random) adapters, the merged copy is a plain model of the source's class and parameter
    names that computes what the adapted one does, and the adapted one is left adapted."""
    from comflp.lora import has_lora, lora_targets, merged, with_lora
    from test_whisper import _features, tiny_whisper

    model = tiny_whisper()
    x, tokens = _features(), torch.tensor([[1, 5, 9, 12], [1, 7, 3, 11]])
    with torch.no_grad():
        base = model(input_features=x, decoder_input_ids=tokens).logits
    assert len(lora_targets(model)) == 4 * 6 + 4 * 10  # encoder: q, k, v, out, fc1, fc2; decoder: also cross-attention
    with_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(input_features=x, decoder_input_ids=tokens).logits, base)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        adapted = model(input_features=x, decoder_input_ids=tokens).logits
        plain = merged(model)
        got = plain(input_features=x, decoder_input_ids=tokens).logits
    assert (adapted - base).abs().max() > 0.1 and has_lora(model) and not has_lora(plain)
    torch.testing.assert_close(got, adapted, rtol=0, atol=1e-5)
    assert type(plain) is type(model) and set(plain.state_dict()) == set(tiny_whisper().state_dict())


def test_lora_healing_trains_only_the_adapters_and_saves_plain_models(tmp_path: Path) -> None:
    """--lora_rank: the layers' linear maps change only by their merged adapters (norms, embeddings, front end
    and head stay the source's), every saved model is plain, and a resumed run continues the adapters."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSpeechSeq2Seq

    from comflp.cli import finetune
    from conftest import make_corpus
    from test_whisper import _whisper_dir

    model_dir, corpus = _whisper_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "ft"
    argv = ["--model", str(model_dir), "--decoder_layers", "2,3", "--batch_size", "3", "--epochs", "2",
            "--grad_accum", "1", "--lr", "1e-2", "--test_num_batch", "1", "--valid_batch_size", "3", "--layerdrop", "0",
            "--lora_rank", "2", "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus),
            "--output_dir", str(out), "--threads", "1", "--quiet"]
    finetune.main(argv)
    source = load_file(str(model_dir / "model.safetensors"))
    for saved in (out / "epoch1", out / "final"):
        healed, info = AutoModelForSpeechSeq2Seq.from_pretrained(saved, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        state = healed.state_dict()
        assert not any("lora" in k for k in state) and healed.config.decoder_layers == 2
        changed = {k for k in state if k.startswith("model.encoder.") and not torch.equal(state[k], source[k])}
        assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
                               for k in changed)
        assert torch.equal(state["model.encoder.conv1.weight"], source["model.encoder.conv1.weight"])
        assert torch.equal(state["model.encoder.layer_norm.weight"], source["model.encoder.layer_norm.weight"])
    last = load_file(str(out / "last" / "model.safetensors"))
    assert any("lora_A" in k for k in last)  # the run's own state keeps the adapters, to resume them
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["lora_rank"] == 2
    finetune.main(argv)  # the same run again: it resumes from last/, adapters and all, with nothing left to do
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
