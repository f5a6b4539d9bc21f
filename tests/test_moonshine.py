"""Moonshine (encoder-decoder over raw audio): both stacks pruned, batch-invariant, through every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import (AutoModelForSpeechSeq2Seq, GenerationConfig, MoonshineConfig,
                          MoonshineForConditionalGeneration, PreTrainedTokenizerFast, Wav2Vec2FeatureExtractor)

from comflp.model import feature_lengths, load_model, num_layers, padding_exact, prune, stack_layers

from conftest import make_corpus

# Moonshine's tokenizer: <unk>, <s> (the decoder's start) and </s> first; here a character vocabulary
MOONSHINE_VOCAB = ["<unk>", "<s>", "</s>", "<pad>", *"你好世界我们是的人"]


def moonshine_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(MOONSHINE_VOCAB)}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_moonshine(seed: int = 0, **overrides) -> MoonshineForConditionalGeneration:
    torch.manual_seed(seed)
    config = MoonshineConfig(**{**dict(vocab_size=len(MOONSHINE_VOCAB), hidden_size=32, intermediate_size=48,
                                       encoder_num_hidden_layers=4, decoder_num_hidden_layers=4,
                                       encoder_num_attention_heads=2, decoder_num_attention_heads=2,
                                       max_position_embeddings=64, decoder_start_token_id=1, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=3, initializer_range=0.3), **overrides})
    model = MoonshineForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=1, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=3, suppress_tokens=[0, 1, 3])
    return model


def moonshine_dir(tmp: Path, seed: int = 5) -> Path:
    """A tiny Moonshine saved as UsefulSensors' checkpoints are: raw unnormalised 16-kHz audio, a tokenizer."""
    out = tmp / "moonshine"
    tiny_moonshine(seed).save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                             return_attention_mask=True).save_pretrained(out)
    moonshine_tokenizer().save_pretrained(out)
    return out


def _audio(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 8000, generator=torch.Generator().manual_seed(seed))


def _generate(model, audio: torch.Tensor, **kwargs):
    out = model.generate(audio, generation_config=GenerationConfig(
        decoder_start_token_id=1, eos_token_id=2, pad_token_id=3, max_new_tokens=6, do_sample=False,
        output_scores=True, return_dict_in_generate=True, use_cache=True), **kwargs)
    return out.sequences, torch.stack(out.scores)


def test_frames_in_closed_form_are_the_models_own() -> None:
    """Moonshine's own method takes one length (it casts to int); the table's conv arithmetic gives the same."""
    model = tiny_moonshine()
    lengths = torch.arange(0, 5000, 7)
    own = torch.tensor([max(0, model._get_feat_extract_output_lengths(int(n))) for n in lengths])
    assert torch.equal(feature_lengths(model, lengths).clamp(min=0), own)
    assert int(feature_lengths(model, torch.tensor([8000]))) == model.get_encoder()(_audio()[:1]).last_hidden_state.shape[1]


@pytest.mark.parametrize("encoder,decoder", [([2, 4], []), ([], [1, 3]), ([1], [2, 4])])
def test_pruned_equals_removed_with_cached_generation(encoder: list[int], decoder: list[int]) -> None:
    from test_whisper import _with_identity

    model = tiny_moonshine()
    audio = _audio()
    pruned = prune(model, encoder, decoder_pruned=decoder)
    handles = _with_identity(model, encoder, decoder)
    try:
        ref_seq, ref_scores = _generate(model, audio)
    finally:
        for h in handles:
            h.remove()
    seq, scores = _generate(pruned, audio)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    assert (pruned.config.encoder_num_hidden_layers, pruned.config.decoder_num_hidden_layers) == \
        (4 - len(encoder), 4 - len(decoder))
    assert [layer.self_attn.layer_idx for layer in stack_layers(pruned, "decoder")] == list(range(4 - len(decoder)))
    assert [layer.encoder_attn.layer_idx for layer in stack_layers(model, "decoder")] == [0, 1, 2, 3]


def test_a_padded_batch_gives_each_utterance_what_it_gets_alone() -> None:
    """Moonshine's group norm reads padding and its frame mask counts 1-2 padded frames as real: under
    padding_exact the shorter utterance's encoder states and generation equal its own, unpadded."""
    model = tiny_moonshine(seed=2)
    audio = _audio(3)
    lengths = [8000, 5100]
    audio[1, 5100:] = 0
    mask = (torch.arange(8000)[None, :] < torch.tensor(lengths)[:, None]).long()
    encoder = model.get_encoder()
    with torch.no_grad():
        alone = encoder(audio[1:, :5100]).last_hidden_state[0]
        n = alone.shape[0]
        padded = encoder(audio, attention_mask=mask)
        assert (padded.last_hidden_state[1, :n] - alone).abs().max() > 1e-3  # the bug padding_exact removes
        with padding_exact(model, lengths):
            exact = encoder(audio, attention_mask=mask)
            seq, scores = _generate(model, audio, attention_mask=mask)
    torch.testing.assert_close(exact.last_hidden_state[1, :n], alone, rtol=0, atol=1e-5)
    assert exact.attention_mask.sum(-1).tolist() == feature_lengths(model, torch.tensor(lengths)).tolist()
    alone_seq, alone_scores = _generate(model, audio[1:, :5100])
    assert torch.equal(seq[1, : alone_seq.shape[1]], alone_seq[0])
    torch.testing.assert_close(scores[: alone_scores.shape[0], 1], alone_scores[:, 0], rtol=0, atol=1e-4)


def test_comflp_prune_saves_what_plain_transformers_reloads_and_generates(tmp_path: Path) -> None:
    from comflp.cli import model as cli
    from comflp.model import model_info

    src = moonshine_dir(tmp_path)
    cli.prune_main(["--model", str(src), "--layers", "3", "--decoder_layers", "1,2", "--output", str(tmp_path / "p")])
    reloaded, info = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (config["encoder_num_hidden_layers"], config["decoder_num_hidden_layers"]) == (3, 2)
    audio = _audio(1)
    expected = prune(load_model(src, allow_encoder_decoder=True).model, [3], decoder_pruned=[1, 2])
    assert torch.equal(_generate(reloaded.eval(), audio)[0], _generate(expected, audio)[0])
    info = model_info(load_model(tmp_path / "p", allow_encoder_decoder=True))
    assert (info.family, info.num_layers, info.decoder_layers) == ("moonshine", 3, 2)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_measure_each_stack_at_any_batch_size(stack: str, tmp_path: Path) -> None:
    from test_whisper import measured_alike_at_batch_sizes

    measured_alike_at_batch_sizes(moonshine_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6), tmp_path, stack)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_fine_search_by_generation_equals_separately_pruned_models(stack: str, tmp_path: Path) -> None:
    """Switching layers off (shared encoder prefixes / one encoder pass, padded batches of 2) decodes what each
    pruned model decodes from each utterance alone."""
    from test_whisper import fine_search_equals_separately_pruned_models

    loaded = load_model(moonshine_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    fine_search_equals_separately_pruned_models(loaded, tmp_path, stack)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_measure_search_prune_test(stack: str, tmp_path: Path) -> None:
    """measure -> search (fine search by generation) -> prune -> test scores the CER the search measured."""
    from comflp.cli import model as cli, search as search_cli, testset as testset_cli
    from test_whisper import _measure

    model, corpus = moonshine_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    npz = _measure(model, corpus, tmp_path / "m.npz", stack=stack)
    strategy = tmp_path / "s.json"
    search_cli.search_main(["--model", str(model), "--measure_file", str(npz), "--num_layers", "4",
                            "--num_clip_layers", "2", "--select_measure", "cosine", "--search_mode", "exact", "--topk_num", "3",
                            "--verify_data_dir", str(corpus), "--test_num_batch", "2", "--verify_batch_size", "3",
                            "--log_dir", str(tmp_path), "--quiet", "--output", str(strategy)])
    pick = json.loads(strategy.read_text())["candidates"][0]
    cli.prune_main(["--model", str(model), "--strategy", str(strategy), "--output", str(tmp_path / "p")])
    report = testset_cli.main(["--model", str(tmp_path / "p"), "--data_dir", str(corpus), "--batch_size", "1",
                               "--output_dir", str(tmp_path / "test")])
    loaded = load_model(tmp_path / "p", allow_encoder_decoder=True)
    assert num_layers(loaded.model, stack) == 2
    assert report["error_rate"] == pytest.approx(pick["cer"], abs=1e-12)


def test_heal_a_pruned_decoder(tmp_path: Path) -> None:
    """Cross-entropy plus distillation on the transcripts; the front end stays frozen when asked."""
    from comflp.cli import finetune

    model_dir, corpus = moonshine_dir(tmp_path), make_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "ft"
    finetune.main(["--model", str(model_dir), "--layers", "2", "--decoder_layers", "2,3", "--batch_size", "3",
                   "--epochs", "2", "--lr", "3e-3", "--test_num_batch", "1", "--valid_batch_size", "3",
                   "--train_data_dir", str(corpus), "--valid_data_dir", str(corpus), "--output_dir", str(out),
                   "--threads", "1", "--quiet", "--freeze_feature_encoder"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[2]["train_loss"] < rows[1]["train_loss"]
    healed, info = AutoModelForSpeechSeq2Seq.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (healed.config.encoder_num_hidden_layers, healed.config.decoder_num_hidden_layers) == (3, 2)
    before = load_model(model_dir, allow_encoder_decoder=True).model.state_dict()
    after = healed.state_dict()
    front = [k for k in after if k.startswith(("model.encoder.conv", "model.encoder.groupnorm"))]
    assert front and all(torch.equal(after[k], before[k]) for k in front)
    assert not torch.equal(after["model.decoder.layers.0.mlp.fc2.weight"], before["model.decoder.layers.0.mlp.fc2.weight"])


def test_export_is_refused_in_one_line(tmp_path: Path) -> None:
    from conftest import run_comflp

    model = moonshine_dir(tmp_path)
    result = run_comflp("export", "--model", str(model), "--format", "ct2", "--output", str(tmp_path / "x"))
    assert result.returncode == 2 and "no format for moonshine" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_without_its_processor_it_reads_raw_unnormalised_audio(tmp_path: Path) -> None:
    out = tmp_path / "bare"
    tiny_moonshine().save_pretrained(out)
    fe = load_model(out, allow_encoder_decoder=True).feature_extractor
    assert type(fe).__name__ == "Wav2Vec2FeatureExtractor" and not fe.do_normalize and fe.return_attention_mask


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_repair_folds_exactly_in_either_stack(stack: str, tmp_path: Path) -> None:
    """A linear repair folds into the feed-forward output projection before the cut (pre-LN layers): the
    reloaded checkpoint equals the source with the layers switched off and the map applied as hooks."""
    from comflp import repair as R
    from comflp.data import collate, read_corpus_dir
    from comflp.model import run_layers
    from comflp.stages import prune as prune_stage, repair

    texts = ["".join(MOONSHINE_VOCAB[4 + (i + j) % 9] for j in range(3 + i % 3)) for i in range(8)]
    utts = read_corpus_dir(make_corpus(tmp_path / "corpus", n=8, texts=texts))
    loaded = load_model(moonshine_dir(tmp_path), allow_encoder_decoder=True, need_tokenizer=True)
    plan = {"layers": [2, 3]} if stack == "encoder" else {"decoder_layers": [2, 3]}
    fitted = repair(loaded, utts, kind="linear", **plan)
    assert [m.cut.block for m in fitted.maps] == [(2, 3)]
    out = prune_stage(loaded, plan.get("layers", []), tmp_path / "out", decoder_layers=plan.get("decoder_layers", []),
                      repair=fitted).path
    reloaded = AutoModelForSpeechSeq2Seq.from_pretrained(out).eval()
    batch = collate(utts[:3], loaded.feature_extractor)
    tokens = torch.tensor([[1, 5, 9, 12], [1, 7, 6, 11], [1, 4, 8, 10]])
    with torch.no_grad(), R.applied(loaded.model, fitted), run_layers(loaded.model, [0, 3], stack):
        reference = loaded.model(input_values=batch.inputs, attention_mask=batch.attention_mask,
                                 decoder_input_ids=tokens).logits
    with torch.no_grad():
        got = reloaded(input_values=batch.inputs, attention_mask=batch.attention_mask, decoder_input_ids=tokens).logits
    assert torch.allclose(got, reference, atol=1e-5)
