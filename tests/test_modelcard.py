"""comflp.modelcard: every model comflp writes carries a card that huggingface_hub reads, with the numbers of
the record beside it and of the test report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from comflp.cli import average as average_cli, finetune as finetune_cli, model as model_cli, testset as test_cli
from comflp.model import count_parameters, load_model
from comflp.strategy import Candidate, StrategyFile

from conftest import make_corpus, save_plain, tiny_model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny wav2vec2 pruned by `comflp prune --strategy` (rank 2 of a hand-made strategy file), a corpus."""
    tmp = tmp_path_factory.mktemp("card")
    source = save_plain(tiny_model("wav2vec2-stable", seed=3), tmp / "source", tmp / "proc")
    strategy = tmp / "s.json"
    StrategyFile(6, [Candidate([1, 2], 0.91, 0.5), Candidate([3, 5], 0.87, 0.6)],
                 meta={"select_measure": "cosine", "error_rate": "CER"}).save(strategy)
    model_cli.prune_main(["--model", str(source), "--strategy", str(strategy), "--rank", "2",
                          "--output", str(tmp / "pruned")])
    return tmp, source, tmp / "pruned", make_corpus(tmp / "corpus", n=8)


def test_a_pruned_model_has_a_card_huggingface_hub_reads(pruned) -> None:
    tmp, source, out, _ = pruned
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(source.resolve())
    assert data["pipeline_tag"] == "automatic-speech-recognition" and data["library_name"] == "transformers"
    assert {"comflp", "layer-pruning", "wav2vec2", "ctc"} <= set(data["tags"])
    assert "model-index" not in data  # not tested yet
    record = json.loads((out / "comflp_card.json").read_text())
    assert record["stacks"] == {"encoder": {"layers": 6, "removed": [3, 5]}}
    assert record["strategy"]["rank"] == 2 and record["strategy"]["score"] == 0.87
    assert record["strategy"]["measure"] == "cosine"
    assert record["parameters"] == {"before": count_parameters(load_model(source).model),
                                    "after": count_parameters(load_model(out).model)}
    assert record["commands"] == [f"comflp prune --model {source} --strategy {tmp / 's.json'} --rank 2 "
                                  f"--output {out}"]
    assert "| encoder | 6 | 3, 5 | 4 |" in card.text and "candidate 2" in card.text and "cosine" in card.text


def test_comflp_test_puts_its_numbers_into_the_card(pruned, tmp_path: Path) -> None:
    """The model-index holds the test report's error rate; a second test set adds a row, the same one replaces
    its row; the card stays a card ModelCard.load reads."""
    _, _, out, corpus = pruned
    first = test_cli.main(["--model", str(out), "--data_dir", str(corpus), "--output_dir", str(tmp_path / "t1")])
    other = make_corpus(tmp_path / "other", n=6)
    test_cli.main(["--model", str(out), "--data_dir", str(other), "--output_dir", str(tmp_path / "t2")])
    again = test_cli.main(["--model", str(out), "--data_dir", str(corpus), "--output_dir", str(tmp_path / "t3"),
                           "--batch_size", "3"])
    report = json.loads((tmp_path / "t3" / "test_asr.json").read_text())
    assert report["error_rate"] == again["error_rate"] == first["error_rate"]
    data = ModelCard.load(out / "README.md").data.to_dict()
    results = data["model-index"][0]["results"]
    assert [r["dataset"]["type"] for r in results] == [str(other.resolve()), str(corpus.resolve())]
    assert results[1]["metrics"][0] == {"type": "cer", "value": 100 * report["error_rate"], "name": "test CER"}
    rows = json.loads((out / "comflp_card.json").read_text())["tests"]
    assert [r["num_utterances"] for r in rows] == [6, 8]


def test_a_card_edited_by_hand_is_left_alone(tmp_path: Path, caplog) -> None:
    source = save_plain(tiny_model("hubert", seed=1), tmp_path / "source", tmp_path / "proc")
    model_cli.prune_main(["--model", str(source), "--layers", "2", "--output", str(tmp_path / "p")])
    card = tmp_path / "p" / "README.md"
    card.write_text(card.read_text() + "\nMy own notes.\n")
    corpus = make_corpus(tmp_path / "corpus", n=6)
    test_cli.main(["--model", str(tmp_path / "p"), "--data_dir", str(corpus), "--output_dir", str(tmp_path / "t")])
    assert card.read_text().endswith("My own notes.\n") and "model-index" not in card.read_text()
    assert "edited since comflp wrote it" in caplog.text
    assert len(json.loads((tmp_path / "p" / "comflp_card.json").read_text())["tests"]) == 1
    # a model comflp did not write gets no card from testing it
    test_cli.main(["--model", str(source), "--data_dir", str(corpus), "--output_dir", str(tmp_path / "t0")])
    assert not (source / "README.md").exists() and not (source / "comflp_card.json").exists()


def test_healing_and_averaging_carry_the_card_in_the_base_models_numbering(pruned, tmp_path: Path) -> None:
    """Fine-tuning the pruned model (removing its layer 1, the base's layer 1) gives final/ and every epoch a
    card whose removed layers are the base's (1, 3, 5), with the healing and every command so far; the
    average says which epochs."""
    _, source, out, corpus = pruned
    exp = tmp_path / "exp"
    finetune_cli.main(["--model", str(out), "--layers", "1", "--epochs", "2", "--batch_size", "4",
                       "--test_num_batch", "1", "--valid_batch_size", "4", "--train_data_dir", str(corpus),
                       "--valid_data_dir", str(corpus), "--output_dir", str(exp), "--quiet"])
    average_cli.main(["--exp_dir", str(exp), "--num", "2", "--mode", "last"])
    metrics = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    for model_dir, epochs in ((exp / "final", 2), (exp / "epoch1", 1), (exp / "model_avg", 2)):
        record = json.loads((model_dir / "comflp_card.json").read_text())
        assert record["base_model"] == str(source.resolve())
        assert record["stacks"]["encoder"] == {"layers": 6, "removed": [1, 3, 5]}
        assert record["healing"]["epochs"] == epochs
        assert record["healing"]["valid_cer"] == metrics[epochs]["valid_cer"]
        assert record["parameters"]["after"] == count_parameters(load_model(model_dir).model)
        # called without the dispatcher, the fine-tuning parser is the paper's script's
        assert [c.split()[:2] for c in record["commands"]][:2] == [["comflp", "prune"],
                                                                  ["python", "clip_finetune_train.py"]]
        ModelCard.load(model_dir / "README.md")
    avg = json.loads((exp / "model_avg" / "comflp_card.json").read_text())
    assert avg["averaged"] == {"epochs": [1, 2]} and avg["commands"][-1].startswith("python average_model_pts.py --exp_dir")


def test_a_whisper_card_says_when_word_timestamps_are_gone(tmp_path: Path) -> None:
    from test_whisper import _whisper_dir

    from comflp.stages import prune

    source = load_model(_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    source.model.generation_config.alignment_heads = [[1, 0], [2, 1]]  # decoder layers 2 and 3 (1-based)
    kept = prune(source, [1], tmp_path / "kept", decoder_layers=[2]).path
    gone = prune(source, [], tmp_path / "gone", decoder_layers=[2, 3]).path
    assert json.loads((kept / "comflp_card.json").read_text())["alignment_heads"] == 1
    assert 'return_timestamps="word"' in (kept / "README.md").read_text()
    assert json.loads((gone / "comflp_card.json").read_text())["alignment_heads"] == 0
    card = ModelCard.load(gone / "README.md")
    assert "Word timestamps are unavailable" in card.text and "encoder-decoder" in card.data.tags
    assert json.loads((gone / "comflp_card.json").read_text())["stacks"] == {
        "encoder": {"layers": 4, "removed": []}, "decoder": {"layers": 4, "removed": [2, 3]}}
