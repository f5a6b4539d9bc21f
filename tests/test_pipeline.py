"""``comflp demo``: a finished stage is never taken from a run with other settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from comflp.demo.pipeline import main


def test_an_exp_dir_of_other_settings_is_refused_not_resumed(tmp_path: Path, capsys) -> None:
    exp = tmp_path / "demo"
    main(["--exp_dir", str(exp), "--stage", "0", "--stop_stage", "0"])  # the corpus stage: records the settings
    assert (exp / ".done" / "0-corpus").exists()
    with pytest.raises(SystemExit) as err:
        main(["--exp_dir", str(exp), "--num_clip_layers", "4", "--stage", "0", "--stop_stage", "0"])
    assert err.value.code != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "num_clip_layers: 6 there, 4 now" in line and "--force (from stage 0)" in line
    # --force from stage 0 starts that experiment afresh there
    main(["--exp_dir", str(exp), "--num_clip_layers", "4", "--stage", "0", "--stop_stage", "0", "--force"])
    assert (exp / ".done" / "0-corpus").exists()


def test_quick_and_full_runs_differ_only_in_healing() -> None:
    """``make demo``'s quick default and ``--full`` run the same stages and print the same table: only the
    healing settings differ (and where the run goes); a healing flag given overrides either."""
    from comflp.demo.pipeline import HEALING, build_parser, resolve_healing

    quick = vars(resolve_healing(build_parser().parse_args([])))
    full = vars(resolve_healing(build_parser().parse_args(["--full"])))
    assert {k for k in quick if quick[k] != full[k]} == {"full", *HEALING["quick"]}
    assert {k: full[k] for k in HEALING["full"]} == {"ft_epochs": 3, "ft_max_train_utts": 1800, "ft_lr": 1e-4,
                                                     "avg_num": 2}  # README's documented run
    assert quick["ft_epochs"] == 1 and quick["ft_max_train_utts"] == 600
    assert resolve_healing(build_parser().parse_args(["--full", "--ft_epochs", "2"])).ft_epochs == 2


def _tiny_demo(model_dir: Path, tmp_path: Path, capsys) -> tuple[Path, Path, str, list[str]]:
    """(corpus, exp dir, printed table, the demo's flags) of `comflp demo --full` on ``model_dir`` over
    6-utterance splits, healing one epoch, the report stage skipped (it needs hundreds of utterances)."""
    from conftest import make_corpus

    corpus = tmp_path / "corpus"
    for split in ("train", "dev", "test"):
        make_corpus(corpus / split, n=6)
    exp = tmp_path / "exp"
    common = ["--model", str(model_dir), "--corpus", str(corpus), "--exp_dir", str(exp), "--threads", "1", "--full",
              "--ft_epochs", "1", "--ft_max_train_utts", "6", "--ft_batch_size", "3", "--avg_num", "1"]
    main([*common, "--stop_stage", "2"])
    main([*common, "--stage", "4"])
    return corpus, exp, capsys.readouterr().out, common


def test_whisper_demo_prunes_both_stacks_against_linspace_and_heals(tmp_path: Path, capsys) -> None:
    """`comflp demo` on an encoder-decoder model: each stack searched, pruned, tested and healed, beside the
    linspace baseline; with 2 of 4 layers the fine search sees every strategy, so its pick is the brute-force
    best on the dev subset and never worse there than linspace's."""
    import itertools
    import json

    from transformers import AutoModelForSpeechSeq2Seq

    from comflp.model import load_model
    from comflp.strategy import StrategyFile
    from comflp.verify import FineSearch

    from test_whisper import _whisper_dir

    model_dir = _whisper_dir(tmp_path)
    corpus, exp, table, common = _tiny_demo(model_dir, tmp_path, capsys)
    assert "stage times: corpus" in table and "finetune" in table.split("stage times:")[1]
    for row in ("full model", "encoder: CoMFLP pick, before healing", "encoder: CoMFLP pick, after healing",
                "encoder: CoMFLP pick repaired (", "decoder: linspace pick",
                "decoder: CoMFLP pick, after healing", "decoder: CoMFLP pick repaired ("):
        assert row in table, table
    for suffix in ("_repaired", "_decoder_repaired"):  # plain checkpoints, the repair recorded beside them
        assert AutoModelForSpeechSeq2Seq.from_pretrained(exp / f"pruned-2{suffix}") is not None
        assert json.loads((exp / f"pruned-2{suffix}" / "comflp_repair.json").read_text())["cuts"]

    loaded = load_model(model_dir, allow_encoder_decoder=True, need_tokenizer=True)
    for stack, suffix in (("encoder", ""), ("decoder", "_decoder")):
        comflp = StrategyFile.load(exp / f"search{suffix}.json")
        linspace = StrategyFile.load(exp / f"linspace{suffix}.json")
        assert comflp.stack == linspace.stack == stack and linspace.candidates[0].pruned == [2, 3]
        engine = FineSearch(loaded, load_corpus(corpus / "dev"), batch_size=4, progress=False, stack=stack)
        every = {tuple(p): r.rate for p, r in zip(itertools.combinations(range(1, 5), 2),
                                                   engine.evaluate([list(p) for p in itertools.combinations(range(1, 5), 2)]))}
        assert comflp.candidates[0].cer == min(every.values())
        assert comflp.candidates[0].cer <= linspace.candidates[0].cer == every[(2, 3)]
        pruned = AutoModelForSpeechSeq2Seq.from_pretrained(exp / f"pruned-2{suffix}")
        depths = (pruned.config.encoder_layers, pruned.config.decoder_layers)
        assert depths == ((2, 4) if stack == "encoder" else (4, 2))
        card = json.loads((exp / f"pruned-2{suffix}" / "comflp_card.json").read_text())  # its model card's record
        assert card["strategy"]["file"] == str((exp / f"search{suffix}.json").resolve())
        assert card["stacks"][stack]["removed"] == comflp.candidates[0].pruned and card["tests"]
        report = json.loads((exp / f"test_healed{suffix}" / "test_asr.json").read_text())
        assert (report["num_layers"], report["decoder_layers"]) == depths
    # a finished run is resumed, not redone (from stage 4: the report stage was never run here)
    main([*common, "--stage", "4"])
    assert "done earlier, skipped" in (exp / "demo.log").read_text()


def load_corpus(path: Path):
    from comflp.data import read_corpus_dir

    return read_corpus_dir(path)


def test_speech_llm_demo_prunes_the_audio_tower_and_the_llm_and_heals(tmp_path: Path, capsys) -> None:
    """`comflp demo` on a speech-LLM: the audio tower and the LLM each searched, pruned, tested and healed beside
    linspace; no repaired row (nothing folds into a speech-LLM's layers) and the tables say which stack lost
    which layers."""
    from transformers import AutoModelForMultimodalLM

    from tiny_speechllm import qwen2_audio_dir

    exp, table = _tiny_demo(qwen2_audio_dir(tmp_path), tmp_path, capsys)[1:3]
    for row in ("full model", "audio tower: CoMFLP pick, before healing", "audio tower: CoMFLP pick, after healing",
                "LLM: CoMFLP pick, after healing", "LLM: linspace pick"):
        assert row in table, table
    assert "repaired" not in table.split("full model")[1] and "encoder:" not in table
    pruned = AutoModelForMultimodalLM.from_pretrained(exp / "finetune_decoder" / "final")
    assert pruned.config.text_config.num_hidden_layers == 2 and pruned.config.audio_config.encoder_layers == 4
