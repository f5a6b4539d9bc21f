from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCTC, LasrFeatureExtractor, ParakeetFeatureExtractor, SeamlessM4TFeatureExtractor, Wav2Vec2Config

from comflp.errors import ComflpError
from comflp.model import (ExtendedWav2Vec2ForCTC, count_parameters, encoder_config, encoder_frames, stack_layers,
                          has_layernorm_head, input_lengths, load_model, min_audio_samples, model_info, num_layers,
                          prune, save_model, skip_layers)

from conftest import FAMILIES, save_plain, tiny_inputs, tiny_model, tiny_processor

PRUNED = [1, 3, 4]


def _identity_skipped_logits(model, pruned: list[int], x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independent reference: the unmodified model with the pruned layers' outputs replaced by their inputs."""
    handles = []
    for i, layer in enumerate(stack_layers(model), start=1):
        if i in pruned:
            def hook(module, args, kwargs, output):
                hidden = args[0] if args else kwargs["hidden_states"]
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**x).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_logits_equal_layer_skipped_logits(family: str) -> None:
    model = tiny_model(family)
    x = tiny_inputs(model)
    reference = _identity_skipped_logits(model, PRUNED, x)
    pruned = prune(model, PRUNED)
    with torch.no_grad():
        got = pruned(**x).logits
        with skip_layers(model, PRUNED):
            switched_off = model(**x).logits
        full_after = model(**x).logits
    assert num_layers(pruned) == 3 and encoder_config(pruned).num_hidden_layers == 3
    assert num_layers(model) == 6 and encoder_config(model).num_hidden_layers == 6  # source untouched
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(switched_off, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(full_after, _identity_skipped_logits(model, [], x), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_pruned_model_loads_with_plain_transformers(family: str, tmp_path: Path) -> None:
    src = save_plain(tiny_model(family), tmp_path / "src", tmp_path / "proc")
    loaded = load_model(src)
    pruned = prune(loaded.model, PRUNED)
    out = save_model(pruned, tmp_path / "pruned", feature_extractor=loaded.feature_extractor,
                     tokenizer=loaded.tokenizer)
    reloaded, info = AutoModelForCTC.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert encoder_config(reloaded).num_hidden_layers == 3 and num_layers(reloaded) == 3
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert files & {"vocab.json", "tokenizer.json"}
    x = tiny_inputs(pruned, 1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**x).logits, pruned(**x).logits, rtol=0, atol=1e-6)


def test_stable_layer_norm_encoder_keeps_final_layer_norm() -> None:
    model = tiny_model("wav2vec2-stable")
    pruned = prune(model, [2, 5])
    assert torch.equal(pruned.wav2vec2.encoder.layer_norm.weight, model.wav2vec2.encoder.layer_norm.weight)


def test_paper_parameter_counts() -> None:
    config = Wav2Vec2Config(vocab_size=4233)  # wav2vec2-base
    with torch.device("meta"):
        model = ExtendedWav2Vec2ForCTC(config)
    assert count_parameters(model) == 97_628_425
    assert count_parameters(prune(model, [1, 3, 5, 7, 9, 11])) == 55_101_193


def test_layernorm_head_detected_and_reloaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_model().config
    model = ExtendedWav2Vec2ForCTC(config).eval()
    # The paper's checkpoint: LayerNorm head weights under a plain Wav2Vec2ForCTC config.
    config.architectures = ["Wav2Vec2ForCTC"]
    src = save_plain(model, tmp_path / "src", tmp_path / "proc")
    assert has_layernorm_head(str(src))
    loaded = load_model(src)
    assert isinstance(loaded.model, ExtendedWav2Vec2ForCTC)
    assert model_info(loaded).head == "layernorm+linear"
    pruned = prune(loaded.model, [2, 3])
    out = save_model(pruned, tmp_path / "pruned", feature_extractor=loaded.feature_extractor)
    reloaded, info = ExtendedWav2Vec2ForCTC.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = tiny_inputs(pruned)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**x).logits, pruned(**x).logits, rtol=0, atol=1e-6)


def test_plain_model_is_not_mistaken_for_layernorm_head(tiny_model_dir: Path) -> None:
    assert not has_layernorm_head(str(tiny_model_dir))
    assert type(load_model(tiny_model_dir).model).__name__ == "Wav2Vec2ForCTC"


def test_model_without_tokenizer_loads_for_measuring(tmp_path: Path) -> None:
    fe, _ = tiny_processor(tmp_path / "proc")
    tiny_model().save_pretrained(tmp_path / "m")
    fe.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.tokenizer is None
    with pytest.raises(ComflpError, match="no tokenizer"):
        load_model(tmp_path / "m", need_tokenizer=True)


@pytest.mark.parametrize("pruned, message", [
    ([0, 2], "outside"), ([7], "outside"), ([2, 2], "duplicates"), ([1, 2, 3, 4, 5, 6], "need 0 < K < 6"),
])
def test_bad_pruning_requests(pruned: list[int], message: str) -> None:
    with pytest.raises(ComflpError, match=message):
        prune(tiny_model(), pruned)


def test_missing_model_dir_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ComflpError, match="model not found"):
        load_model(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ComflpError, match="cannot load model config"):
        load_model(tmp_path / "empty")


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    model = tiny_model()
    out = save_model(model, tmp_path / "m")
    with pytest.raises(ComflpError, match="--overwrite"):
        save_model(prune(model, [1]), out)
    save_model(prune(model, [1]), out, overwrite=True)
    assert AutoModelForCTC.from_pretrained(out).config.num_hidden_layers == 5
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        out = save_model(tiny_model(), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644, modes
    assert out.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("extractor", [ParakeetFeatureExtractor(), SeamlessM4TFeatureExtractor(), SeamlessM4TFeatureExtractor(stride=3),
                                       LasrFeatureExtractor()])
def test_input_lengths_count_the_frames_the_feature_extractor_makes(extractor) -> None:
    rng = np.random.default_rng(0)
    for n in [400, 401, 559, 560, 719, 720, 1600, *rng.integers(400, 40000, 40).tolist()]:
        made = extractor([rng.standard_normal(n).astype(np.float32)], sampling_rate=16000, return_attention_mask=True)
        assert int(np.asarray(made["attention_mask"]).sum()) == int(input_lengths(extractor, torch.tensor([n]))[0]), n


def test_input_lengths_count_the_frames_qwen3_asrs_processor_makes() -> None:
    """Qwen3-ASR's processor extracts each utterance padded to its own length (``padding=True``), clips shorter
    than half a second zero-padded to it first."""
    from transformers import Qwen3ASRFeatureExtractor

    extractor, rng = Qwen3ASRFeatureExtractor(feature_size=16), np.random.default_rng(0)
    for n in [1, 159, 160, 161, 7999, 8000, 8001, 8160, 8161, *rng.integers(1, 40000, 30).tolist()]:
        made = extractor([rng.standard_normal(n).astype(np.float32)], sampling_rate=16000, padding=True,
                         return_attention_mask=True, n_window=0)
        assert int(np.asarray(made["attention_mask"]).sum()) == int(input_lengths(extractor, torch.tensor([n]))[0]), n


@pytest.mark.parametrize("family", ["wav2vec2-bert", "parakeet_ctc", "lasr_ctc"])
def test_feature_input_model_saved_without_processor_gets_its_family_extractor(family: str, tmp_path: Path,
                                                                                 caplog) -> None:
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "plain")  # no preprocessor_config.json
    loaded = load_model(tmp_path / "plain")
    assert loaded.feature_extractor.model_input_names[0] == "input_features"
    assert "no preprocessor_config.json" in caplog.text
    info = model_info(loaded)
    assert info.num_layers == 6 and info.hidden_size == 32 and info.family == family
    # the shortest audio that gives one frame, and one sample less gives none
    least = min_audio_samples(loaded.model, loaded.feature_extractor)
    frames = [int(encoder_frames(loaded.model, loaded.feature_extractor, torch.tensor([n]))[0]) for n in (least - 1, least)]
    assert frames == [0, 1]


def _layer_calls(model, inputs: dict, stacks: tuple[str, ...]) -> int:
    """How many layers of ``stacks`` ran in one training-mode forward."""
    from comflp.model import stack_layers

    calls = [0]
    handles = [layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
               for stack in stacks for layer in stack_layers(model, stack)]
    model.train()
    try:
        model(**inputs)
    finally:
        model.eval()
        for h in handles:
            h.remove()
    return calls[0]


@pytest.mark.parametrize("family", [*FAMILIES, "whisper"])
def test_layerdrop_acts_where_the_family_has_it(family: str) -> None:
    """--layerdrop reaches what each family reads when training (Whisper and Parakeet copy it into their
    modules when built, so setting the config alone did nothing); SEW-D has none and says so."""
    from comflp.model import num_layers, set_layerdrop

    if family == "whisper":
        from test_whisper import tiny_whisper

        model = tiny_whisper()
        inputs = {"input_features": torch.randn(1, 80, 100), "decoder_input_ids": torch.tensor([[1, 5, 6]])}
        stacks = ("encoder", "decoder")
    else:
        model, inputs, stacks = tiny_model(family), tiny_inputs(tiny_model(family)), ("encoder",)
    total = sum(num_layers(model, s) for s in stacks)
    torch.manual_seed(0)
    assert set_layerdrop(model, 0.0) == (family != "sew-d")
    assert _layer_calls(model, inputs, stacks) == total
    acts = set_layerdrop(model, 0.99999)
    torch.manual_seed(0)
    kept = 1 if family == "wavlm" else 0  # WavLM never drops its first layer, which computes the position bias
    assert _layer_calls(model, inputs, stacks) == (kept if acts else total)


@pytest.mark.parametrize("family", [*FAMILIES, "whisper"])
def test_the_fingerprint_follows_content_not_place(family: str, tmp_path: Path) -> None:
    """Every family's model gets a fingerprint (0-dim buffers and all); a saved and reloaded copy keeps it,
    one changed weight changes it."""
    from comflp.model import fingerprint, load_model

    if family == "whisper":
        from test_whisper import tiny_whisper

        model = tiny_whisper()
        model.save_pretrained(tmp_path / "m")
        saved = load_model(tmp_path / "m", need_features=False, allow_encoder_decoder=True).model
    else:
        model = tiny_model(family)
        saved = load_model(save_plain(model, tmp_path / "m", tmp_path / "p"), need_features=False).model
    assert fingerprint(saved) == fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert fingerprint(saved) != fingerprint(model)
