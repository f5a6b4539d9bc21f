"""Tiny random speech-LLMs of every class the family table knows (configs after transformers' own tests'), and
their tiny processors: a character tokenizer with Qwen's chat and audio tokens, each family's feature extractor."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

# the tiny processor's tokenizer: Qwen's chat and audio tokens first, then a character vocabulary
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>", "<unk>"]
CHARS = [*"你好世界我们是的人", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .:,\n", *"<>_\""]
VOCAB = 96
AUDIO_TOKEN = 4
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=256, initializer_range=0.3,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
assert len(SPECIAL) + len(CHARS) <= VOCAB
# a Whisper-style audio tower, tiny: 16 mel bins, a window of 96 frames (48 positions)
_WHISPER_TOWER = dict(num_mel_bins=16, d_model=32, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=48,
                      max_source_positions=48)
_GRANITE_ENCODER = dict(input_dim=16, num_layers=4, hidden_dim=32, num_heads=2, dim_head=16, output_dim=8,
                        context_size=10, max_pos_emb=20, dropout=0.0)
_QFORMER = dict(model_type="blip_2_qformer", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=48, encoder_hidden_size=32)


def speech_llm_config(family: str):
    if family == "qwen2_audio":  # Qwen2's sliding-window layers: layer_types and max_window_layers follow the layers
        return transformers.Qwen2AudioConfig(
            audio_config=dict(model_type="qwen2_audio_encoder", **{**_WHISPER_TOWER, "max_source_positions": 50}),
            text_config=dict(model_type="qwen2", **_TEXT, use_sliding_window=True, sliding_window=4,
                             max_window_layers=2),
            audio_token_index=AUDIO_TOKEN)
    if family == "voxtral":  # the projector reads 4 frames at once: intermediate_size = 4 x hidden_size
        return transformers.VoxtralConfig(
            audio_config=dict(model_type="voxtral_encoder", num_mel_bins=16, hidden_size=32, num_hidden_layers=4,
                              num_attention_heads=2, intermediate_size=128, max_source_positions=48, vocab_size=VOCAB),
            text_config=dict(model_type="llama", **_TEXT), audio_token_id=AUDIO_TOKEN)
    if family == "voxtral-tekken":  # with its processor: a byte-level tekken vocabulary, windows of 0.64 s
        return transformers.VoxtralConfig(
            audio_config=dict(model_type="voxtral_encoder", num_mel_bins=16, hidden_size=32, num_hidden_layers=4,
                              num_attention_heads=2, intermediate_size=128, max_source_positions=32,
                              vocab_size=TEKKEN_VOCAB),
            text_config=dict(model_type="llama", **{**_TEXT, "vocab_size": TEKKEN_VOCAB, "pad_token_id": 11}),
            audio_token_id=24)
    if family == "qwen3_asr":  # windows of 100 frames
        return transformers.Qwen3ASRConfig(
            audio_config=dict(model_type="qwen3_asr_encoder", num_mel_bins=16, d_model=32, encoder_layers=4,
                              encoder_attention_heads=2, encoder_ffn_dim=48, output_dim=32, n_window=50,
                              n_window_infer=800, downsample_hidden_size=8),
            text_config=dict(model_type="qwen3", **_TEXT), audio_token_id=AUDIO_TOKEN)
    if family == "glmasr":
        return transformers.GlmAsrConfig(
            audio_config=dict(model_type="glmasr_encoder", num_mel_bins=16, hidden_size=32, num_hidden_layers=4,
                              num_attention_heads=2, intermediate_size=128, max_position_embeddings=100),
            text_config=dict(model_type="llama", **_TEXT), audio_token_id=AUDIO_TOKEN)
    if family == "granite_speech":
        return transformers.GraniteSpeechConfig(
            encoder_config=dict(model_type="granite_speech_encoder", **_GRANITE_ENCODER), projector_config=_QFORMER,
            text_config=dict(model_type="granite", **_TEXT), audio_token_index=AUDIO_TOKEN, window_size=5,
            downsample_rate=5)
    if family == "granite_speech_plus":  # hidden states 0 and 2 concatenated beside the last
        return transformers.GraniteSpeechPlusConfig(
            encoder_config=dict(model_type="granite_speech_plus_encoder", **_GRANITE_ENCODER, cat_hidden_layers=[0, 2]),
            projector_config={**_QFORMER, "encoder_hidden_size": 96},
            text_config=dict(model_type="granite", **_TEXT), audio_token_index=AUDIO_TOKEN, window_size=5,
            downsample_rate=5, has_lora_adapter=False)
    raise KeyError(family)


SPEECH_LLMS = ["qwen2_audio", "voxtral", "qwen3_asr", "glmasr", "granite_speech", "granite_speech_plus"]
# the forward's name of the audio frames' mask, where the family takes one
FEATURE_MASK = {"qwen2_audio": "feature_attention_mask", "qwen3_asr": "input_features_mask",
                 "glmasr": "input_features_mask"}


def tiny_speech_llm(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForMultimodalLM.from_config(speech_llm_config(family)).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


def audio_prompt(model, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(input_ids [1, N], the audio keyword arguments): a few text tokens around as many audio placeholders as
    the model's audio tower and projector make of random features."""
    family = model.config.model_type
    g = torch.Generator().manual_seed(seed)
    granite = family.startswith("granite")
    frames = 100 if family in ("qwen3_asr", "qwen2_audio") else 96  # Qwen2-Audio: a 1-s window
    features = torch.randn(1, 40, 16, generator=g) if granite else torch.randn(1, 16, frames, generator=g)
    audio = {"input_features": features}
    if family in FEATURE_MASK:
        audio[FEATURE_MASK[family]] = torch.ones(1, frames, dtype=torch.long)
    with torch.no_grad():
        if family == "qwen2_audio":
            count = int(model.model.audio_tower._get_feat_extract_output_lengths(torch.tensor([frames]))[1])
        else:
            count = model.model.get_audio_features(**audio).pooler_output.numel() // model.config.text_config.hidden_size
    if granite:
        audio["input_features_mask"] = torch.ones(1, count, dtype=torch.bool)
    ids = torch.tensor([[5, 6, *[AUDIO_TOKEN] * count, 7, 8, 9]])
    assert AUDIO_TOKEN not in (5, 6, 7, 8, 9)
    return ids, audio


def run_prompt(model, ids: torch.Tensor, audio: dict):
    """(logits of the prompt, greedy tokens with the cache, their scores)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **audio).logits
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **audio, max_new_tokens=6,
                             do_sample=False, num_beams=1, use_cache=True, output_scores=True,
                             return_dict_in_generate=True)
    return logits, out.sequences, torch.stack(out.scores)


# Granite feeds its CTC output back after encoder layer depth // 2: without layer 1 of 4 it stays after source
# layer 2 (now the first of 3, and 3 // 2 = 1)
ENCODER_SETS = {"granite_speech": [1], "granite_speech_plus": [1]}


def chat_tokenizer(**named):
    """A character tokenizer with Qwen's chat and audio tokens (<|AUDIO|> is AUDIO_TOKEN); ``named``: special
    tokens the processor reads by attribute (Qwen3-ASR's ``audio_token``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                     eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                     extra_special_tokens=named)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:6]})
    assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") == AUDIO_TOKEN
    return tokenizer


# a ChatML template rendering an audio item as its placeholder between Qwen's audio markers
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
           "{% else %}{% for c in m['content'] %}{% if c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
           "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Voxtral's tokenizer (mistral_common's tekken): its special tokens first ([AUDIO] is 24, as VoxtralProcessor
# assumes), then the 256 bytes
TEKKEN_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
                  "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "[AUDIO]", "[BEGIN_AUDIO]", "[TRANSCRIBE]",
                  *[f"<SPECIAL_{i}>" for i in range(27, 32)]]
TEKKEN_VOCAB = len(TEKKEN_SPECIAL) + 256
# tiktoken's pattern of Mistral's tekken files
_TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                   r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
                   r"\s+(?!\S)|\s+")


def voxtral_processor(tmp: Path):
    """Voxtral's processor, tiny: a tekken tokenizer of the 256 bytes (mistral_common's format, written to
    ``tmp``/tekken.json) whose audio config makes 12.5 audio tokens per second in windows of 0.64 s (8 tokens:
    the tower's 32 positions, 4 per token), so an utterance spans several, and a Whisper extractor of 16 mel
    bins."""
    import base64
    import json

    tmp.mkdir(parents=True, exist_ok=True)
    tekken = {"config": {"pattern": _TEKKEN_PATTERN, "num_vocab_tokens": 256, "default_vocab_size": TEKKEN_VOCAB,
                         "default_num_special_tokens": len(TEKKEN_SPECIAL), "version": "v7"},
              "vocab": [{"rank": b, "token_bytes": base64.b64encode(bytes([b])).decode(), "token_str": None}
                        for b in range(256)],
              "special_tokens": [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(TEKKEN_SPECIAL)],
              "version": 1, "type": "Tekken",
              "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 0.64,
                        "audio_encoding_config": {"num_mel_bins": 16, "hop_length": 160, "window_size": 400}}}
    (tmp / "tekken.json").write_text(json.dumps(tekken), encoding="utf-8")
    tokenizer = transformers.MistralCommonBackend.from_pretrained(str(tmp))
    features = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    return transformers.VoxtralProcessor(feature_extractor=features, tokenizer=tokenizer)


def speech_llm_processor(family: str = "qwen2_audio"):
    """The family's processor, tiny: a Whisper window of 16 mel bins (1 s for Qwen2-Audio, 2 s for GLM-ASR,
    whose projector merges 4 frames; Qwen3-ASR's own extractor, padding to its 100-frame chunks), the character
    tokenizer; Qwen2-Audio's own chat template, a ChatML one for GLM-ASR and Qwen3-ASR (their checkpoints ship
    theirs)."""
    if family == "qwen3_asr":
        tokenizer = chat_tokenizer(audio_token="<|AUDIO|>", audio_bos_token="<|audio_bos|>",
                                    audio_eos_token="<|audio_eos|>")
        return transformers.Qwen3ASRProcessor(feature_extractor=transformers.Qwen3ASRFeatureExtractor(
            feature_size=16), tokenizer=tokenizer, chat_template=CHATML)
    tokenizer = chat_tokenizer()
    if family == "glmasr":
        return transformers.GlmAsrProcessor(feature_extractor=transformers.WhisperFeatureExtractor(
            feature_size=16, chunk_length=2), tokenizer=tokenizer, chat_template=CHATML, audio_token="<|AUDIO|>")
    features = transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1)
    return transformers.Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer)


def speech_llm_dir(tmp: Path, family: str = "qwen2_audio", seed: int = 3) -> Path:
    """A tiny speech-LLM saved with its processor, generating until Qwen's end of turn (Voxtral: until </s>)."""
    out = tmp / family
    if family == "voxtral":
        model = tiny_speech_llm("voxtral-tekken", seed)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=11)
        processor = voxtral_processor(tmp / "tekken")
    else:
        model = tiny_speech_llm(family, seed)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=0)
        processor = speech_llm_processor(family)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def qwen2_audio_dir(tmp: Path, seed: int = 3) -> Path:
    return speech_llm_dir(tmp, "qwen2_audio", seed)


WITH_PROCESSORS = ["qwen2_audio", "glmasr", "qwen3_asr", "voxtral"]
