"""Whisper (encoder-decoder): both layer stacks pruned, cache indices and alignment heads renumbered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForSpeechSeq2Seq, GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration)

from comflp.cli import model as cli
from comflp.errors import ComflpError
from comflp.model import load_model, model_info, num_layers, prune, stack_layers

ALIGNMENT_HEADS = [[0, 1], [1, 0], [2, 1], [3, 0], [3, 1]]
# the demo Whisper's character tokenizer (Whisper's start and end tokens around the text) over a few characters
WHISPER_VOCAB = ["<pad>", "<|startoftranscript|>", "<|endoftext|>", "<unk>", *"你好世界我们是的人"]


def whisper_tokenizer():
    from comflp.demo.recipes import build_whisper_processor

    tok = build_whisper_processor("".join(WHISPER_VOCAB[4:]))[1]
    assert tok.convert_ids_to_tokens(list(range(len(WHISPER_VOCAB)))) == WHISPER_VOCAB
    return tok


def tiny_whisper(seed: int = 0, **overrides) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(**{**dict(vocab_size=len(WHISPER_VOCAB), num_mel_bins=80, encoder_layers=4,
                                     decoder_layers=4, encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
                                     encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=50,
                                     max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2,
                                     bos_token_id=1, begin_suppress_tokens=None, suppress_tokens=None, init_std=0.3),
                              **overrides})
    model = WhisperForConditionalGeneration(config).eval()
    # as Whisper's own generation config does, never generate the padding or the start token
    model.generation_config = GenerationConfig(decoder_start_token_id=1, eos_token_id=2, pad_token_id=0,
                                               alignment_heads=ALIGNMENT_HEADS, suppress_tokens=[0, 1],
                                               begin_suppress_tokens=[2])
    return model


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(seed))


def _with_identity(model, encoder: list[int], decoder: list[int]):
    """Independent reference: the unmodified model with the pruned layers' outputs replaced by their inputs."""
    handles = []
    for stack, pruned in (("encoder", encoder), ("decoder", decoder)):
        for i, layer in enumerate(stack_layers(model, stack), start=1):
            if i in pruned:
                def hook(module, args, kwargs, output):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
                handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    return handles


def _generate(model, features: torch.Tensor):
    out = model.generate(features, generation_config=GenerationConfig(
        decoder_start_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=6, do_sample=False,
        output_scores=True, return_dict_in_generate=True, use_cache=True))
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("encoder,decoder", [([2, 4], []), ([], [1, 3]), ([1], [2, 4])])
def test_pruned_equals_removed_with_cached_generation(encoder: list[int], decoder: list[int]) -> None:
    model = tiny_whisper()
    x = _features()
    tokens = torch.tensor([[1, 5, 9, 12], [1, 7, 3, 11]])
    pruned = prune(model, encoder, decoder_pruned=decoder)
    handles = _with_identity(model, encoder, decoder)
    try:
        with torch.no_grad():
            reference = model(input_features=x, decoder_input_ids=tokens).logits
        ref_seq, ref_scores = _generate(model, x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = pruned(input_features=x, decoder_input_ids=tokens).logits
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    seq, scores = _generate(pruned, x)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    assert (num_layers(pruned), num_layers(pruned, "decoder")) == (4 - len(encoder), 4 - len(decoder))
    assert (pruned.config.encoder_layers, pruned.config.decoder_layers) == (4 - len(encoder), 4 - len(decoder))
    # the kept decoder layers carry their new cache index; the source keeps its own
    assert [layer.self_attn.layer_idx for layer in stack_layers(pruned, "decoder")] == list(range(4 - len(decoder)))
    assert [layer.encoder_attn.layer_idx for layer in stack_layers(model, "decoder")] == [0, 1, 2, 3]


def test_alignment_heads_follow_their_decoder_layers() -> None:
    pruned = prune(tiny_whisper(), [], decoder_pruned=[2, 3])  # keeps decoder layers 0 and 3 (0-based)
    assert pruned.generation_config.alignment_heads == [[0, 1], [1, 0], [1, 1]]
    assert tiny_whisper().generation_config.alignment_heads == ALIGNMENT_HEADS


def test_comflp_prune_saves_what_plain_transformers_reloads_and_generates(tmp_path: Path) -> None:
    model = tiny_whisper(seed=3)
    src = tmp_path / "whisper"
    model.save_pretrained(src)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(src)
    cli.prune_main(["--model", str(src), "--layers", "3", "--decoder_layers", "1,2", "--output", str(tmp_path / "p")])
    reloaded, info = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (config["encoder_layers"], config["decoder_layers"]) == (3, 2)
    generation = json.loads((tmp_path / "p" / "generation_config.json").read_text())
    assert generation["alignment_heads"] == [[0, 1], [1, 0], [1, 1]]
    x = _features(1)
    expected = prune(model, [3], decoder_pruned=[1, 2])
    assert torch.equal(_generate(reloaded.eval(), x)[0], _generate(expected, x)[0])
    info = model_info(load_model(tmp_path / "p", allow_encoder_decoder=True))
    assert (info.family, info.num_layers, info.decoder_layers) == ("whisper", 3, 2)


def test_ctc_commands_refuse_an_encoder_decoder_model_in_one_line(tmp_path: Path) -> None:
    tiny_whisper().save_pretrained(tmp_path / "w")
    with pytest.raises(ComflpError, match="encoder-decoder model"):
        load_model(tmp_path / "w")
    from conftest import tiny_model

    with pytest.raises(ComflpError, match="no decoder"):
        prune(tiny_model("wav2vec2"), [1], decoder_pruned=[1])


def _whisper_dir(tmp: Path) -> Path:
    """A tiny Whisper saved with a 1-s feature window (its encoder takes 100 frames) and a character tokenizer."""
    out = tmp / "whisper"
    tiny_whisper(seed=5).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out)
    whisper_tokenizer().save_pretrained(out)
    return out


def _measure(model_dir: Path, corpus: Path, out: Path, *, stack: str = "decoder", measures: str = "cosine",
             batch_size: int = 3, iter_num: int = 2) -> Path:
    from comflp.cli import measure as analysis

    analysis.measure_main(["--model", str(model_dir), "--data_dir", str(corpus), "--batch_size", str(batch_size),
                           "--iter_num", str(iter_num), "--measures", measures, "--stack", stack, "--no_plot",
                           "--quiet", "--dump_dir", str(out.parent), "--output", str(out)])
    return out


def measured_alike_at_batch_sizes(model: Path, corpus: Path, tmp: Path, stack: str) -> None:
    """``stack`` of a 4-layer ``model`` measured (cosine, CKA) at batch 3 and at batch 1 gives the same 5 x 5
    matrices, recorded as that stack's."""
    from comflp.cli import measure as analysis

    matrices = []
    for bs, iters in ((3, 2), (1, 6)):
        out = _measure(model, corpus, tmp / f"m{bs}.npz", stack=stack, measures="cosine,cka", batch_size=bs,
                       iter_num=iters)
        m, meta = analysis.load_npz(out)
        assert meta["stack"] == stack and meta["num_layers"] == 4 and m["cosine"].shape == (5, 5)
        matrices.append(m)
    for name in ("cosine", "cka"):
        np.testing.assert_allclose(matrices[0][name], matrices[1][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_measure_each_stack_at_any_batch_size(stack: str, tmp_path: Path) -> None:
    from conftest import make_corpus

    measured_alike_at_batch_sizes(_whisper_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6), tmp_path, stack)


def test_captured_states_are_each_stacks_hidden_states(tmp_path: Path) -> None:
    """Hidden state 0 is the input of layer 1; the states at the real frames / tokens are the model's own."""
    from comflp.data import collate, read_corpus_dir
    from comflp.hidden import capture_layer_states
    from comflp.model import call, layer_frame_mask
    from comflp.prompt import Prompt, teacher_forcing_labels

    from conftest import make_corpus

    loaded = load_model(_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    model, utts = loaded.model, read_corpus_dir(make_corpus(tmp_path / "corpus", n=3))
    batch = collate(utts, loaded.feature_extractor)
    labels = teacher_forcing_labels(model, loaded.tokenizer, batch.texts, Prompt())
    with torch.no_grad():
        with capture_layer_states(model, "encoder") as enc:
            call(model, batch.inputs, batch.attention_mask)
            frames = layer_frame_mask(model, batch.attention_mask, enc[0].shape[1]).sum(-1)
            enc = list(enc)
        with capture_layer_states(model, "decoder") as dec:
            call(model, batch.inputs, batch.attention_mask, labels=labels)
            dec = list(dec)
        for i, u in enumerate(utts):
            alone = collate([u], loaded.feature_extractor)
            own = model(input_features=alone.inputs, labels=labels[i: i + 1, : int((labels[i] != -100).sum())],
                        output_hidden_states=True)
            n, t = int(frames[i]), int((labels[i] != -100).sum())
            assert 0 < n < enc[0].shape[1]
            for layer in range(4):  # HF's last state is after the final layer norm; comflp's is the layer's output
                torch.testing.assert_close(enc[layer][i, :n], own.encoder_hidden_states[layer][0, :n],
                                           rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(dec[layer][i, :t], own.decoder_hidden_states[layer][0, :t],
                                           rtol=1e-4, atol=1e-4)


def test_measuring_a_decoder_needs_transcripts(tmp_path: Path) -> None:
    from conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus", n=6)
    (corpus / "text").unlink()
    with pytest.raises(SystemExit) as err:
        _measure(_whisper_dir(tmp_path), corpus, tmp_path / "m.npz")
    assert err.value.code != 0 and not (tmp_path / "m.npz").exists()


def test_decoder_search_strategy_round_trips_and_prunes_the_decoder(tmp_path: Path) -> None:
    """measure --stack decoder -> search (coarse; and the linspace baseline) -> a strategy with stack -> prune."""
    from comflp.cli import search as search_cli
    from comflp.strategy import StrategyFile

    from conftest import make_corpus

    model_dir, corpus = _whisper_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    npz = _measure(model_dir, corpus, tmp_path / "dec.npz", measures="cosine")
    common = ["--measure_file", str(npz), "--num_layers", "4", "--num_clip_layers", "2", "--coarse_search_only", "true",
              "--log_dir", str(tmp_path), "--quiet"]
    found = search_cli.search_main([*common, "--select_measure", "cosine", "--search_mode", "exact",
                                    "--output", str(tmp_path / "s.json")])
    loaded = StrategyFile.load(tmp_path / "s.json")
    assert loaded.stack == found.stack == "decoder" and loaded.candidates == found.candidates
    assert json.loads((tmp_path / "s.json").read_text())["stack"] == "decoder"
    line = search_cli.search_main([*common, "--select_measure", "linspace", "--output", str(tmp_path / "l.json")])
    assert [c.pruned for c in line.candidates] == [[2, 3]]  # keeps the first and the last of 4
    with pytest.raises(SystemExit):  # the matrix was measured on the decoder
        search_cli.search_main([*common, "--select_measure", "cosine", "--stack", "encoder",
                                "--output", str(tmp_path / "x.json")])
    cli.prune_main(["--model", str(model_dir), "--strategy", str(tmp_path / "l.json"), "--output", str(tmp_path / "p")])
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (config["encoder_layers"], config["decoder_layers"]) == (4, 2)
    # a CTC strategy file still reads as the encoder's, and its JSON has no stack field
    ctc = StrategyFile(4, found.candidates, {})
    ctc.save(tmp_path / "c.json")
    assert "stack" not in json.loads((tmp_path / "c.json").read_text())
    assert StrategyFile.load(tmp_path / "c.json").stack == "encoder"


def fine_search_equals_separately_pruned_models(loaded, tmp_path: Path, stack: str) -> None:
    """Switching layers of ``stack`` off in a fine search (batches of 2) decodes what each separately pruned model
    decodes from each utterance alone, with no shared computation; the sets really decode differently."""
    from comflp.data import collate, read_corpus_dir
    from comflp.strategy import Candidate
    from comflp.verify import FineSearch, verify

    from conftest import make_corpus

    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=5))
    sets = [[1], [2, 3], [4], [1, 4]]
    engine = FineSearch(loaded, utts, batch_size=2, progress=False, stack=stack)
    report = verify(engine, [Candidate(s) for s in sets])
    distinct = set()
    for s, hyps in zip(sets, engine.transcribe(sets)):
        model = prune(loaded.model, s if stack == "encoder" else [], decoder_pruned=s if stack == "decoder" else [])
        separately = []
        for u in utts:
            batch = collate([u], loaded.feature_extractor)
            ids = model.generate(batch.inputs, attention_mask=batch.attention_mask,
                                 max_new_tokens=engine.max_new_tokens, do_sample=False, num_beams=1)
            separately.append(loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)[0])
        assert hyps == separately
        distinct.add(tuple(hyps))
    assert len(distinct) > 1
    assert [c.pruned for c in report.candidates] == sets and report.best.cer == min(c.cer for c in report.candidates)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_fine_search_by_generation_equals_separately_pruned_models(stack: str, tmp_path: Path) -> None:
    """Switching layers off (shared encoder prefixes / one encoder pass) decodes what each pruned model decodes."""
    loaded = load_model(_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    fine_search_equals_separately_pruned_models(loaded, tmp_path, stack)


@pytest.mark.parametrize("multilingual", [False, True])
def test_search_and_glp_verify_a_decoder_by_generation(multilingual: bool, tmp_path: Path) -> None:
    """Search and GLP on a decoder; on a multilingual Whisper whose generation config forces no language they
    record the languages the full model detected (and detect none once the config forces one)."""
    from comflp.cli import search as search_cli

    from conftest import make_corpus

    model_dir = multilingual_whisper_dir(tmp_path) if multilingual else _whisper_dir(tmp_path)
    corpus = make_corpus(tmp_path / "corpus", n=6)
    npz = _measure(model_dir, corpus, tmp_path / "dec.npz", measures="cosine")
    verify = ["--model", str(model_dir), "--verify_data_dir", str(corpus), "--num_layers", "4", "--num_clip_layers",
              "2", "--test_num_batch", "2", "--verify_batch_size", "3", "--log_dir", str(tmp_path), "--quiet"]
    found = search_cli.search_main([*verify, "--measure_file", str(npz), "--select_measure", "cosine",
                                    "--search_mode", "exact", "--topk_num", "3", "--race", "false",
                                    "--output", str(tmp_path / "s.json")])
    assert found.stack == "decoder" and len(found.candidates) == 3
    cers = [c.cer for c in found.candidates]
    assert cers == sorted(cers) and found.meta["verify_utterances"] == 6
    glp = search_cli.glp_main([*verify, "--stack", "decoder", "--output", str(tmp_path / "g.json")])
    assert glp.stack == "decoder" and len(glp.candidates[0].pruned) == 2
    assert glp.meta["evaluations"] == 4 + 3
    if not multilingual:
        assert "languages" not in found.meta
        return
    assert sum(found.meta["languages"].values()) == 6 and glp.meta["languages"] == found.meta["languages"]
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["forced_decoder_ids"][0][1] = config["lang_to_id"]["<|en|>"]  # now the checkpoint forces English
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    forced = search_cli.search_main([*verify, "--measure_file", str(npz), "--select_measure", "cosine",
                                     "--search_mode", "exact", "--topk_num", "3", "--output", str(tmp_path / "f.json")])
    assert "languages" not in forced.meta


def test_heal_a_pruned_decoder_and_test_it(tmp_path: Path) -> None:
    """Fine-tuning an encoder-decoder: cross-entropy plus distillation from the unpruned teacher, then `comflp test`."""
    from comflp.cli import average, finetune, testset as testset_cli

    from conftest import make_corpus

    model_dir, corpus = _whisper_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "ft"
    finetune.main(["--model", str(model_dir), "--decoder_layers", "2,3", "--batch_size", "3", "--epochs", "3",
                   "--layerdrop", "0", "--grad_accum", "1", "--lr", "3e-3", "--test_num_batch", "1", "--valid_batch_size", "3", "--train_data_dir",
                   str(corpus), "--valid_data_dir", str(corpus), "--output_dir", str(out), "--threads", "1",
                   "--quiet"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and all(np.isfinite(r["train_loss"]) for r in rows[1:])
    assert rows[3]["train_loss"] < rows[1]["train_loss"]  # it learns the transcripts
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["pruned"] == [] and settings["decoder_pruned"] == [2, 3]
    healed, info = AutoModelForSpeechSeq2Seq.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (healed.config.encoder_layers, healed.config.decoder_layers) == (4, 2)
    average.main(["--exp_dir", str(out), "--num", "2"])  # the best two epochs by validation CER
    report = testset_cli.main(["--model", str(out / "model_avg"), "--data_dir", str(corpus), "--batch_size", "2",
                               "--output_dir", str(tmp_path / "test")])
    assert report["num_layers"] == 4 and 0 <= report["error_rate"]


def test_demo_whisper_start_is_a_small_whisper_with_a_character_vocabulary(tmp_path: Path) -> None:
    import argparse

    from comflp.demo.recipes import whisper_init

    out = whisper_init(argparse.Namespace(output=tmp_path / "init", encoder_layers=4, decoder_layers=4, d_model=192,
                                          seed=0, overwrite=False))
    loaded = load_model(out, allow_encoder_decoder=True, need_tokenizer=True)
    assert 2 * sum(p.numel() for p in loaded.model.parameters()) <= 15e6  # the shipped fp16 size
    from comflp.data import read_corpus_dir
    from comflp.paths import demo_split

    text = read_corpus_dir(demo_split("train"))[0].text
    ids = loaded.tokenizer(text).input_ids
    assert ids[0] == loaded.model.config.decoder_start_token_id and ids[-1] == loaded.model.config.eos_token_id
    assert loaded.tokenizer.unk_token_id not in ids
    assert loaded.tokenizer.decode(ids, skip_special_tokens=True) == "".join(text.split())
    assert loaded.feature_extractor.nb_max_frames == 2 * loaded.model.config.max_source_positions


def test_whole_model_training_prunes_nothing(tmp_path: Path) -> None:
    from comflp.cli import finetune

    from conftest import make_corpus, save_plain, tiny_model

    model = save_plain(tiny_model("wav2vec2-stable", seed=1), tmp_path / "m", tmp_path / "proc")
    corpus = make_corpus(tmp_path / "corpus", n=6)
    finetune.main(["--model", str(model), "--whole_model", "--batch_size", "3", "--epochs", "1", "--lr", "1e-3",
                   "--test_num_batch", "1", "--valid_batch_size", "3", "--train_data_dir", str(corpus),
                   "--valid_data_dir", str(corpus), "--output_dir", str(tmp_path / "ft"), "--threads", "1", "--quiet"])
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["settings"]["pruned"] == []
    trained = load_model(tmp_path / "ft" / "final").model
    assert num_layers(trained) == 6
    with pytest.raises(SystemExit):  # nothing said about layers is still an error
        finetune.main(["--model", str(model), "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus),
                       "--output_dir", str(tmp_path / "ft2"), "--quiet"])


def test_measure_report_on_a_decoder(tmp_path: Path) -> None:
    """Which measure predicts the generated CER of decoder strategies (measure-report with the decoder's matrices)."""
    from comflp.cli import report as report_cli

    from conftest import make_corpus

    model_dir, corpus = _whisper_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    npz = _measure(model_dir, corpus, tmp_path / "dec.npz", measures="cosine,cka")
    common = ["--measure_file", str(npz), "--num_clip_layers", "2", "--model", str(model_dir), "--verify_data_dir",
              str(corpus), "--test_num_batch", "2", "--verify_batch_size", "3", "--output", str(tmp_path / "r.json"),
              "--bootstrap", "20", "--quiet"]
    with pytest.raises(SystemExit) as refused:  # 2 of 4 layers: 6 strategies in all
        report_cli.main([*common, "--num_strategies", "7"])
    assert refused.value.code == 2 and not (tmp_path / "r.json").exists()
    out = report_cli.main(common)  # by default every strategy when there are fewer than 40, as on a 4-layer stack
    report = json.loads(out.read_text())
    assert report["settings"]["stack"] == "decoder" and set(report["measures"]) == {"cosine", "cka"}
    assert sorted(map(tuple, (s["pruned"] for s in report["strategies"]))) == [
        (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]


def test_whisper_without_its_processor_gets_its_window_and_a_wrong_one_is_named(tmp_path: Path) -> None:
    model = tiny_whisper()
    model.save_pretrained(tmp_path / "plain")  # no preprocessor_config.json
    fe = load_model(tmp_path / "plain", allow_encoder_decoder=True).feature_extractor
    assert fe.nb_max_frames == 2 * model.config.max_source_positions and fe.feature_size == 80
    WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path / "plain")  # 30 s: not this encoder's
    with pytest.raises(ComflpError, match="pads to 3000 frames but the encoder takes 100"):
        load_model(tmp_path / "plain", allow_encoder_decoder=True)


# a multilingual Whisper's prompt tokens, as the hub's openai/whisper-* generation configs name them
MULTILINGUAL_TOKENS = ["<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]


def multilingual_whisper_dir(tmp: Path, seed: int = 7) -> Path:
    """A tiny multilingual Whisper whose generation config forces no language, as a real multilingual
    checkpoint's does (lang_to_id, task_to_id, is_multilingual, forced_decoder_ids without a language,
    alignment heads, suppress tokens): generation detects each utterance's language."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = WHISPER_VOCAB + MULTILINGUAL_TOKENS
    ids = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex("."), behavior="isolated")])
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftranscript|> <|notimestamps|> $A <|endoftext|>",
        special_tokens=[("<|startoftranscript|>", 1), ("<|notimestamps|>", ids["<|notimestamps|>"]),
                        ("<|endoftext|>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftranscript|>",
                                  eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=MULTILINGUAL_TOKENS)
    model = tiny_whisper(seed, vocab_size=len(tokens))
    lang = {t: ids[t] for t in ("<|en|>", "<|zh|>")}
    task = {"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=1, eos_token_id=2, pad_token_id=0, alignment_heads=ALIGNMENT_HEADS,
        suppress_tokens=[0], begin_suppress_tokens=[2], lang_to_id=lang, task_to_id=task, is_multilingual=True,
        forced_decoder_ids=[[1, None], [2, task["transcribe"]]], no_timestamps_token_id=ids["<|notimestamps|>"],
        max_length=32)
    out = tmp / "whisper-multilingual"
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_fine_search_on_a_multilingual_whisper_gives_every_candidate_the_full_models_language(
        stack: str, tmp_path: Path) -> None:
    """A generation config that forces no language: the full model detects each utterance's language once and
    every candidate decodes with that prompt (it used to end in transformers' ValueError for the decoder's
    shared encoder outputs), equal to separately pruned models given the same languages."""
    from comflp.data import collate, read_corpus_dir
    from comflp.prompt import detect_languages
    from comflp.prompt import Prompt, needs_detection
    from comflp.verify import FineSearch

    from conftest import make_corpus

    loaded = load_model(multilingual_whisper_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    assert needs_detection(loaded.model, Prompt())
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=5))
    sets = [[1], [2, 3], [4]]
    engine = FineSearch(loaded, utts, batch_size=2, progress=False, stack=stack)
    found = engine.transcribe(sets)
    languages = {u.utt_id: detect_languages(loaded.model, collate([u], loaded.feature_extractor))[0] for u in utts}
    assert engine.languages == languages and set(languages.values()) <= {"<|en|>", "<|zh|>"}
    for s, hyps in zip(sets, found):
        model = prune(loaded.model, s if stack == "encoder" else [], decoder_pruned=s if stack == "decoder" else [])
        separately = []
        for u in utts:
            ids = model.generate(collate([u], loaded.feature_extractor).inputs, max_new_tokens=engine.max_new_tokens,
                                 do_sample=False, num_beams=1, language=languages[u.utt_id])
            separately.append(loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)[0])
        assert hyps == separately


def test_prune_says_which_stack_lost_which_layers(tmp_path: Path, capsys) -> None:
    from comflp.strategy import Candidate, StrategyFile

    model_dir = _whisper_dir(tmp_path)
    strategy = tmp_path / "dec.json"
    StrategyFile(4, [Candidate([2, 4])], {}, stack="decoder").save(strategy)
    cli.prune_main(["--model", str(model_dir), "--strategy", str(strategy), "--output", str(tmp_path / "a")])
    assert "pruned decoder layers [2, 4] of 4: 4 encoder and 2 decoder layers left" in capsys.readouterr().out
    cli.prune_main(["--model", str(model_dir), "--layers", "1", "--decoder_layers", "3", "--output",
                    str(tmp_path / "b")])
    assert "pruned encoder layers [1] of 4 and decoder layers [3] of 4: 3 encoder and 3 decoder" in \
        capsys.readouterr().out


def _first_decoder_input(model, **generate_kwargs) -> list[list[int]]:
    """The token ids ``generate`` feeds the decoder first: its prompt (transformers' own rule)."""
    seen = []

    def grab(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        seen.append(ids.tolist())

    handle = model.model.decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.generate(_features(3), max_new_tokens=2, do_sample=False, num_beams=1, **generate_kwargs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("language,task", [(None, None), ("zh", None), ("english", "translate"), (None, "translate"),
                                           ("<|en|>", "transcribe")])
def test_the_prompt_builder_gives_the_tokens_generate_decodes_after(language, task, tmp_path: Path) -> None:
    """comflp.prompt's prefix (teacher forcing, labels) equals the prompt transformers' generate feeds the decoder,
    for given, forced and detected languages and tasks."""
    from types import SimpleNamespace

    from comflp.prompt import detect_languages
    from comflp.prompt import Prompt, check_prompt, generate_kwargs, needs_detection, prefix_ids

    model = load_model(multilingual_whisper_dir(tmp_path), allow_encoder_decoder=True).model
    prompt = check_prompt(model, Prompt(language, task))
    x = _features(3)
    detected = detect_languages(model, SimpleNamespace(inputs=x), prompt)
    assert (detected is None) == (not needs_detection(model, prompt))
    fed = _first_decoder_input(model, **generate_kwargs(prompt, detected))
    assert fed == [prefix_ids(model, prompt, detected[i] if detected else None) for i in range(2)]
    # a checkpoint that forces its language and task in forced_decoder_ids (no --language)
    config = model.generation_config
    config.forced_decoder_ids = [[1, config.lang_to_id["<|zh|>"]], [2, config.task_to_id["translate"]]]
    if language is None and task is None:
        assert _first_decoder_input(model) == [prefix_ids(model, Prompt())] * 2 == [[1, 14, 15, 17]] * 2
    # the demo's character Whisper has no prompt tokens beyond the start token
    tiny = tiny_whisper()
    assert _first_decoder_input(tiny) == [prefix_ids(tiny, Prompt())] * 2 == [[1]] * 2


def test_language_and_task_are_checked_in_one_line(tmp_path: Path, capsys) -> None:
    from comflp.cli import measure as analysis, testset as testset_cli

    from conftest import make_corpus, save_plain, tiny_model
    from test_bad_input import refused

    corpus = make_corpus(tmp_path / "corpus", n=6)
    multilingual, characters = multilingual_whisper_dir(tmp_path), _whisper_dir(tmp_path)
    ctc = save_plain(tiny_model("wav2vec2"), tmp_path / "ctc", tmp_path / "proc")
    common = ["--data_dir", str(corpus), "--output_dir", str(tmp_path / "t")]
    refused(testset_cli.main, ["--model", str(multilingual), "--language", "fr", *common], capsys,
            "--language fr", "en, zh")
    refused(testset_cli.main, ["--model", str(characters), "--language", "en", *common], capsys,
            "no language tokens")
    refused(testset_cli.main, ["--model", str(characters), "--task", "translate", *common], capsys,
            "no task tokens")
    refused(testset_cli.main, ["--model", str(ctc), "--language", "en", *common], capsys, "encoder-decoder")
    refused(analysis.measure_main, ["--model", str(ctc), "--data_dir", str(corpus), "--language", "en",
                                    "--dump_dir", str(tmp_path / "d"), "--no_plot", "--quiet"], capsys,
            "encoder-decoder")
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()


def test_finetune_and_test_take_the_language(tmp_path: Path) -> None:
    from comflp.cli import finetune, testset as testset_cli
    from comflp.prompt import Prompt, teacher_forcing_labels

    from conftest import make_corpus

    model_dir, corpus = multilingual_whisper_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    loaded = load_model(model_dir, allow_encoder_decoder=True, need_tokenizer=True)
    labels = teacher_forcing_labels(loaded.model, loaded.tokenizer, ["你好"], Prompt("<|zh|>"))
    assert labels.tolist() == [[14, 16, 17, 4, 5, 2]]  # <|zh|> <|transcribe|> <|notimestamps|> 你 好 <|endoftext|>
    out = tmp_path / "ft"
    finetune.main(["--model", str(model_dir), "--decoder_layers", "2", "--batch_size", "3", "--max_updates", "2",
                   "--grad_accum", "1", "--test_num_batch", "1", "--valid_batch_size", "3", "--train_data_dir",
                   str(corpus), "--valid_data_dir", str(corpus), "--output_dir", str(out), "--threads", "1",
                   "--quiet", "--language", "zh"])
    assert json.loads((out / "run.json").read_text())["settings"]["language"] == "zh"
    report = testset_cli.main(["--model", str(out / "final"), "--data_dir", str(corpus), "--language", "chinese",
                               "--output_dir", str(tmp_path / "test")])
    assert report["prompt"] == {"language": "chinese", "task": None}


def test_english_text_is_scored_through_whispers_english_normaliser(tmp_path: Path) -> None:
    """"8"/"eight" and "colours"/"colors" are not errors in English (Whisper's English normaliser with the
    tokenizer's spelling table), when the text is known to be English; otherwise the basic normaliser."""
    from types import SimpleNamespace

    from comflp.heads import normalize_words, word_normalizer
    from comflp.prompt import Prompt

    multilingual = load_model(multilingual_whisper_dir(tmp_path), allow_encoder_decoder=True).model
    spelled = SimpleNamespace(english_spelling_normalizer={"colours": "colors"})
    text = "Eight colours!"
    assert word_normalizer(multilingual, spelled, Prompt("<|en|>"))(text) == "8 colors"
    assert word_normalizer(multilingual, spelled, Prompt("<|zh|>")) is normalize_words
    assert word_normalizer(multilingual, spelled, Prompt()) is normalize_words  # detected: unknown before the audio
    english_only = tiny_whisper()  # no language tokens, as an .en checkpoint
    assert word_normalizer(english_only, spelled, Prompt())(text) == "8 colors"
    assert word_normalizer(english_only, SimpleNamespace(), Prompt()) is normalize_words  # no spelling table


def test_test_and_fine_search_generate_under_one_cap(tmp_path: Path) -> None:
    """comflp test (transcribe) and the fine search cap new tokens alike, so the unpruned model's hypotheses
    are the same in both (a random model babbles: the cap is what ends it)."""
    from comflp.data import read_corpus_dir
    from comflp.decode import transcribe
    from comflp.heads import generation_limit
    from comflp.verify import FineSearch

    from conftest import make_corpus

    out = tmp_path / "long"
    tiny_whisper(seed=5, max_target_positions=128).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out)
    whisper_tokenizer().save_pretrained(out)
    loaded = load_model(out, allow_encoder_decoder=True, need_tokenizer=True)
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=4))
    engine = FineSearch(loaded, utts, batch_size=2, progress=False, stack="decoder")
    tested = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=3)
    assert tested.hypotheses == engine.transcribe([[]])[0]
    cap = generation_limit(loaded.model, loaded.tokenizer, [u.text for u in utts])
    assert cap < loaded.model.config.max_target_positions // 2  # the references' cap, not the model's
    assert max(len(loaded.tokenizer(h, add_special_tokens=False).input_ids) for h in tested.hypotheses) == cap


def test_an_end_token_that_is_also_the_unknown_token_is_not_counted_as_unknown() -> None:
    """Whisper's tokenizer uses <|endoftext|> as its unknown token and appends it to every text: only the
    text's own tokens count (a real tiny.en measured 8% 'unknown' tokens before this)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from comflp.vocab import unknown_token_share

    vocab = {"<|endoftext|>": 0, "<|startoftranscript|>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftranscript|> $A <|endoftext|>", special_tokens=[("<|startoftranscript|>", 1),
                                                                          ("<|endoftext|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert unknown_token_share(["hello world", "world"], tok) == 0.0
    assert unknown_token_share(["hello moon"], tok) == 0.5


def test_default_corpus_is_the_one_in_the_models_language(tmp_path: Path, monkeypatch) -> None:
    """Without a data dir, a command reads the embedded corpus in the language the model writes: English for
    an English-only Whisper (.en) or --language en, Mandarin for a Whisper or CTC vocabulary of CJK characters
    and for a multilingual Whisper that detects the language; a CTC vocabulary of ASCII letters is English."""
    from types import SimpleNamespace

    from comflp import paths
    from comflp.cli import testset as testset_cli
    from comflp.cli.options import corpus_split
    from comflp.decode import text_language
    from comflp.prompt import Prompt

    from conftest import make_corpus, tiny_model

    english_only = tiny_whisper()
    ascii_vocab = SimpleNamespace(get_vocab=lambda: {"<pad>": 0, "|": 1, "a": 2, "b": 3, "'": 4})
    assert text_language(english_only, ascii_vocab) == "en"
    assert text_language(english_only, whisper_tokenizer()) == "zh"  # no language tokens, Mandarin characters
    multilingual = load_model(multilingual_whisper_dir(tmp_path), allow_encoder_decoder=True)
    assert text_language(multilingual.model, multilingual.tokenizer) is None  # detected from the audio
    assert text_language(multilingual.model, multilingual.tokenizer, Prompt("en")) == "en"
    assert text_language(multilingual.model, multilingual.tokenizer, Prompt("zh")) == "zh"
    ctc = tiny_model("wav2vec2")
    assert text_language(ctc, ascii_vocab) == "en" and text_language(ctc, whisper_tokenizer()) == "zh"
    assert text_language(ctc, SimpleNamespace(get_vocab=lambda: {"é": 0, "a": 1})) is None
    assert text_language(ctc, None) is None
    assert corpus_split(None, "dev", multilingual, Prompt("en")) == paths.DEMO_CORPUS_DIRS["en"] / "dev"
    assert corpus_split(None, "dev", multilingual, Prompt()) == paths.DEMO_CORPUS_DIRS["zh"] / "dev"
    assert corpus_split(tmp_path / "mine", "dev", multilingual, Prompt("en")) == tmp_path / "mine"

    # end to end: `comflp test` on an English-only Whisper reads the English corpus's test split
    english_dir = tmp_path / "whisper-en"
    english_only.save_pretrained(english_dir)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(english_dir)
    _english_tokenizer().save_pretrained(english_dir)
    monkeypatch.setitem(paths.DEMO_CORPUS_DIRS, "en", tmp_path / "demo-en")
    make_corpus(tmp_path / "demo-en" / "test", n=2, texts=["a b", "b a"])
    summary = testset_cli.main(["--model", str(english_dir), "--batch_size", "2", "--output_dir",
                                str(tmp_path / "out")])
    assert summary["data_dir"] == str(tmp_path / "demo-en" / "test") and summary["num_utterances"] == 2
    # and `comflp finetune` trains and validates on its train and dev splits
    from comflp.cli import finetune

    for split in ("train", "dev"):
        make_corpus(tmp_path / "demo-en" / split, n=2, texts=["a b", "b a"])
    finetune.main(["--model", str(english_dir), "--decoder_layers", "2", "--batch_size", "2", "--max_updates", "1",
                   "--test_num_batch", "1", "--valid_batch_size", "2", "--output_dir", str(tmp_path / "ft"),
                   "--threads", "1", "--quiet"])
    settings = json.loads((tmp_path / "ft" / "run.json").read_text())["settings"]
    assert [Path(settings[k]).parent.name for k in ("train_data_dir", "valid_data_dir")] == ["demo-en"] * 2


def _english_tokenizer():
    """The tiny Whisper's tokenizer with ASCII letters in place of its Mandarin characters."""
    from comflp.demo.recipes import build_whisper_processor

    return build_whisper_processor("abcdefghi")[1]


def test_a_whisper_saved_without_its_tokenizer_is_refused_in_one_line(tmp_path: Path) -> None:
    """transformers 5 builds an empty WhisperTokenizer when no tokenizer file is there: every transcript would
    be empty and score 100%, exit 0. comflp refuses it in one line, writing nothing."""
    from conftest import make_corpus, run_comflp

    model_dir = _whisper_dir(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    result = run_comflp("test", "--model", str(model_dir), "--data_dir", str(make_corpus(tmp_path / "corpus", n=2)),
                        "--output_dir", str(tmp_path / "t"))
    assert result.returncode == 2 and "has no tokenizer" in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (tmp_path / "t").exists()
