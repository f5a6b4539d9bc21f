"""Whisper (encoder-decoder): both layer stacks pruned, cache indices and alignment heads renumbered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForSpeechSeq2Seq, GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration)

from comflp import cli
from comflp.errors import ComflpError
from comflp.model import load_model, model_info, num_layers, prune, stack_layers

ALIGNMENT_HEADS = [[0, 1], [1, 0], [2, 1], [3, 0], [3, 1]]


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=60, num_mel_bins=80, encoder_layers=4, decoder_layers=4,
                           encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, max_source_positions=50, max_target_positions=32,
                           decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
                           begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=1, eos_token_id=2, pad_token_id=0,
                                               alignment_heads=ALIGNMENT_HEADS)
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
    tokens = torch.tensor([[1, 5, 9, 13], [1, 7, 3, 11]])
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
    WhisperFeatureExtractor(feature_size=80).save_pretrained(src)
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
