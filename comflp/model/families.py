"""The family table: what differs between model families, in one place.

The rest of comflp asks :func:`family_of` for a model's entry and reads its fields; no module tests a family
name. A family has one or two layer stacks (:class:`Stack`), a head kind (``kind``: how it turns audio into
text, :mod:`comflp.heads`), an input kind, a front end, what makes a padded batch exact (:mod:`.exact`), where
a repair folds (:mod:`comflp.repair`), and where LayerDrop is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ComflpError

STACKS = ("encoder", "decoder")
# the names a speech-LLM's stacks go by besides encoder and decoder (``--stack audio``, ``--stack llm``)
STACK_ALIASES = {"audio": "encoder", "llm": "decoder"}


@dataclass(frozen=True)
class Stack:
    """One layer stack of a family.

    ``layers``: the dotted path of its ``nn.ModuleList`` under the base model; ``depth_field``: the config field
    holding its depth, read in ``config`` (a sub-config's attribute name, e.g. Parakeet's ``encoder_config``;
    None: the model's own config); ``cache_index``: the attribute by which a module inside a layer knows its
    layer's position (the key-value cache slot, transformers' ``layer_idx``), renumbered when layers go;
    ``cacheable``: the stack runs once per forward, so the fine search caches its layers' outputs along
    shared kept-layer prefixes (a decoder runs once per generated token: it cannot).

    Index-bearing fields of ``config`` that pruning rewrites (the layers kept decide them):
    ``layer_lists``: one entry per layer (an LLM's ``layer_types``: full or sliding-window attention), the kept
    layers' entries kept; ``prefix_counts``: a count of the stack's first layers (Qwen2's
    ``max_window_layers``), which becomes the number of kept layers among them; ``state_indices``: a list of
    hidden-state indices (0: the stack's input, i: layer i's output; Granite Speech Plus's
    ``cat_hidden_layers``, concatenated into the projector's input), each becoming the index of the last
    kept layer at or before it, as switching layers off would read (refused where two become one, which
    would change the projector's width). ``depth_copies``: (module path under the base model, attribute)
    of a module that copied the depth when built (Granite's encoder ``num_layers``), set with the config.
    ``half_feedback``: the model feeds its CTC output back into the stack after layer ``depth // 2``
    (1-based; Granite Speech): the pruned stack must do so after the same kept layer (the last kept one at
    or before the source's), which holds only for some layer sets; others are refused in one line.
    """

    layers: str = "encoder.layers"
    depth_field: str = "num_hidden_layers"
    config: str | None = None
    cache_index: str = "layer_idx"
    cacheable: bool = True
    layer_lists: tuple[str, ...] = ()
    prefix_counts: tuple[str, ...] = ()
    state_indices: tuple[str, ...] = ()
    depth_copies: tuple[tuple[str, str], ...] = ()
    half_feedback: bool = False

    @property
    def refuses_sets(self) -> bool:
        """Some layer sets cannot be pruned from the stack (``half_feedback``, ``state_indices``)."""
        return bool(self.half_feedback or self.state_indices)


@dataclass(frozen=True)
class Pooling:
    """A family that pools frames before its layers (SEW, SEW-D): the layers run at 1/squeeze of the encoder's
    frame rate.

    ``squeeze_field``: the config field of the squeeze factor; ``mask``: where the pooled frame mask reaches
    the layers, ``"layers"`` (a 4-D mask to each layer) or a module path taking it as its second argument;
    ``upsample``: the module that spreads the pooled frames back, whose output past
    ``floor(frames / squeeze) * squeeze`` is zeroed, as the encoder pads a shorter utterance's output.
    """

    squeeze_field: str
    mask: str
    upsample: str


@dataclass(frozen=True)
class TowerFrames:
    """How many real frames each utterance has in a speech-LLM audio tower's layers.

    ``mask``: the model input holding the audio frames' mask, [B, T_in] (1: a real input frame); None: the
    frames are counted from each utterance's audio samples, [B];
    ``lengths``: (base model, that mask or those samples, the processor's feature extractor) -> [B] real
    frames at the layers, by the model's own arithmetic;
    ``layout``: how the layers hold the frames, which the measuring turns into [B, T, D] rows: ``"rows"``,
    one row per utterance; ``"packed"`` (Qwen3-ASR), every utterance's real frames end to end as one [N, D]
    sequence, split by the lengths; ``"windows"`` (Voxtral), rows of fixed windows of T frames, each
    utterance's ceil(frames / T) consecutive windows joined.
    """

    mask: str | None
    lengths: Callable[[nn.Module, torch.Tensor, object], torch.Tensor]
    layout: str = "rows"


def _whisper_tower_frames(base: nn.Module, mask: torch.Tensor, features=None) -> torch.Tensor:
    """Qwen2-Audio: its tower's own output-length method (the first of the pair it returns)."""
    return base.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))[0]


def _padded_conv_lengths(base: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """[B] mel frames through the audio tower's two padded convs, each n -> floor((n + 2p - d(k - 1) - 1) / s) + 1."""
    for conv in (base.audio_tower.conv1, base.audio_tower.conv2):
        span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        lengths = torch.div(lengths + 2 * conv.padding[0] - span, conv.stride[0], rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def _padded_conv_tower_frames(base: nn.Module, mask: torch.Tensor, features=None) -> torch.Tensor:
    """GLM-ASR: the real mel frames through the tower's two padded convs."""
    return _padded_conv_lengths(base, mask.sum(-1).long())


def _windowed_tower_frames(base: nn.Module, samples: torch.Tensor, features) -> torch.Tensor:
    """Voxtral: ceil(n / hop) mel frames (those centred inside the audio, as for Whisper), through the tower's
    two padded convs; the windows after the last real frame are padding."""
    hop = int(features.hop_length)
    return _padded_conv_lengths(base, torch.div(samples.long() + hop - 1, hop, rounding_mode="floor"))


def _chunked_tower_frames(base: nn.Module, mask: torch.Tensor, features=None) -> torch.Tensor:
    """Qwen3-ASR: the mel frames cut in chunks of 2 x ``n_window``, each chunk's real frames through the three
    strided convs (the tower's own ``_post_cnn_length``), summed over the utterance's chunks."""
    tower = base.audio_tower
    chunk = 2 * int(tower.n_window)
    per_chunk = mask.reshape(mask.shape[0], -1, chunk).sum(-1).long()
    return tower._post_cnn_length(per_chunk).sum(-1)


@dataclass(frozen=True)
class Family:
    """What differs between model families; the rest of comflp asks this table, never the family name.

    Paths are dotted attribute paths under the base model (:func:`base_model`).
    ``encoder``, ``decoder``: the layer stacks (:class:`Stack`); an encoder-decoder family (Whisper) has both,
    a CTC family the encoder only.
    ``kind``: the head kind, how the model turns audio into text (``"ctc"``: a CTC head and greedy collapse;
    ``"seq2seq"``: a decoder with a prompt, teacher forcing and generation; ``"speechllm"``: an LLM prompted
    with audio tokens; :mod:`comflp.heads`).
    ``input_kind``: the forward's input, ``input_values`` ([B, T] audio samples) or ``input_features``
    ([B, T, C] frames computed by the feature extractor); the attention mask is at that input's time steps.
    ``output_lengths``: the model's method mapping input lengths to the layers' input frames (None: counted at
    the input's rate; a speech-LLM's audio tower, whose frames only decide whether an utterance is long enough
    to decode while measuring it is not offered).
    ``feature_encoder``: the front end between the input and the first layer (frozen when fine-tuning,
    computed once per batch in fine search).
    ``per_batch``: further modules before the first layer whose output depends on the batch only (the feature
    projection, the positional convolution), computed once per batch in fine search beside the front end;
    a path whose module the model does not have (or holds None) is passed over.
    ``position_conv_layers``: the path of a positional convolution built as a stack of conv layers, whose
    padded frames must be zeroed between layers for batching to be exact (see :func:`.exact.padding_exact`).
    ``front_end_exact``: the front end gives each utterance of a padded batch what it gives alone (feature
    inputs are computed per utterance by the feature extractor, and these front ends mask padded frames).
    ``depthwise_conv``: the path, inside each layer, of a "same"-padded depthwise convolution over time (a
    conformer's), whose input :func:`.exact.padding_exact` zeroes on padded frames, as an utterance alone has
    zeros there.
    ``pooling``: frames pooled before the layers (:class:`Pooling`), or None.
    ``default_features``: the feature extractor class assumed for a model saved without one.
    ``head``: the output head's attribute on the model (a CTC head, or Whisper's projection).
    ``auto_class``: the transformers auto class that loads the family.
    ``layerdrop``: the fields of the encoder's config that hold the LayerDrop probability;
    ``layerdrop_modules``: the modules (paths under the base model) that copied it when they were built
    (Whisper's stacks, Parakeet's encoder) and read their own ``layerdrop`` when training. A family with
    neither has no LayerDrop (SEW-D).
    Where a repair map folds (:mod:`comflp.repair`): ``end_norm``, inside a layer, the LayerNorm whose output
    is the layer's output (post-LN layers); ``ffn_output``, inside a layer, the feed-forward's output
    projection, whose output plus the residual is the layer's output (pre-LN layers); ``pre_norm_field``:
    the config field that, when true, makes the layers pre-LN (wav2vec2's ``do_stable_layer_norm``; None:
    the family has one kind, ``end_norm`` if set); ``ffn_extra``: a module inside a layer that, when
    present, adds to the output after the feed-forward (MMS adapters), so nothing folds there;
    ``input_norm``: the LayerNorm (under the base model) whose output is hidden state 0, in post-LN
    encoders. ``window_read_whole``: the encoder takes a fixed window (Whisper's 30 s) and what comes after it
    reads every position of it, padding included (Whisper's decoder cross-attends to the whole window), so
    a repair of the encoder is fitted on every position, not only on the real frames.
    ``conv_front_end``: a front end that is a chain of unpadded strided convolutions over raw audio (paths
    under the base model, Moonshine's ``encoder.conv1``..``conv3``): frames follow from their kernels and
    strides in closed form (Moonshine's own output-length method casts one length to ``int`` and takes no
    batch), and they are frozen and computed once per batch with the front end.
    ``time_norm``: a group norm over time inside that chain (its path, and how many of the chain's convs come
    before it), which :func:`.exact.padding_exact` gives statistics over real frames only.
    ``subsampled_mask``: (module path, stride) of a module that takes the input's attention mask and keeps
    every ``stride``-th step of it as its frame mask (Moonshine's encoder, every 384th sample), which counts
    one or two frames computed from padding as real; :func:`.exact.padding_exact` hands it a mask whose kept
    steps mark exactly the real frames.
    ``decoder_positions``: the config field of the decoder's positions (the cap on new tokens reads it).
    ``export_format``: what ``comflp export`` writes for the family, when not its head kind's (``""``: no
    export, e.g. no CTranslate2 converter for Moonshine).
    ``instruction``: a speech-LLM's transcription request, the text after the audio in the user's turn of
    its chat template.
    ``audio_frames``: where a speech-LLM's audio tower's real frames are, for measuring it
    (:class:`TowerFrames`; None: not known, its measuring refused).
    ``stack_aliases``: the :data:`STACK_ALIASES` the family's stacks also answer to (a speech-LLM's ``audio``
    and ``llm``); ``stack_titles``: what reports call each stack (a speech-LLM's "audio tower" and "LLM"; by
    default its name).
    ``transcription_request``: (model, processor, one waveform, ``--language`` or None) -> that utterance's
    inputs [1, ...], for a family whose processor makes its own transcription request
    (``apply_transcription_request``: Qwen3-ASR's, the audio alone in the user's turn, a language prefilled as
    the answer's tag; Voxtral's transcription mode, ``lang:xx[TRANSCRIBE]``), used unless ``--instruction``
    asks for a chat turn; None: the chat template renders the audio and the request (``instruction``), and
    ``--language`` is refused.
    ``transcript_decoding``: the keyword arguments of the processor's ``decode`` that strip the family's own
    output format from a generated answer (Qwen3-ASR's ``language <LANG><asr_text>`` tag, GLM-ASR's framing
    sentence); empty: its plain ``batch_decode``.
    ``audio_in_chat``: a speech-LLM whose processor takes the audio inside the chat turn (Voxtral's: its
    tokenizer, mistral_common, counts the audio tokens) rather than beside the rendered prompt text: (model,
    processor) -> the audio keyword arguments its processor needs (None: the audio goes beside the text; a
    family with a ``transcription_request`` and no ``audio_in_chat`` has no chat turn: ``--instruction`` is
    refused).
    """

    encoder: Stack = field(default_factory=Stack)
    decoder: Stack | None = None
    kind: str = "ctc"
    input_kind: str = "input_values"
    output_lengths: str | None = "_get_feat_extract_output_lengths"
    feature_encoder: str = "feature_extractor"
    per_batch: tuple[str, ...] = ("feature_projection", "encoder.pos_conv_embed")
    position_conv_layers: str | None = None
    front_end_exact: bool = False
    depthwise_conv: str | None = None
    pooling: Pooling | None = None
    default_features: str = "Wav2Vec2FeatureExtractor"
    head: str = "lm_head"
    auto_class: str = "AutoModelForCTC"
    layerdrop: tuple[str, ...] = ("layerdrop",)
    layerdrop_modules: tuple[str, ...] = ()
    end_norm: str | None = "final_layer_norm"
    ffn_output: str | None = "feed_forward.output_dense"
    pre_norm_field: str | None = "do_stable_layer_norm"
    ffn_extra: str | None = "adapter_layer"
    input_norm: str | None = "encoder.layer_norm"
    window_read_whole: bool = False
    conv_front_end: tuple[str, ...] = ()
    time_norm: tuple[str, int] | None = None
    subsampled_mask: tuple[str, int] | None = None
    decoder_positions: str = "max_target_positions"
    export_format: str | None = None
    instruction: str = "Transcribe the audio."
    audio_frames: TowerFrames | None = None
    stack_aliases: tuple[str, ...] = ()
    stack_titles: tuple[tuple[str, str], ...] = ()
    transcription_request: Callable[[nn.Module, object, object, str | None], dict] | None = None
    transcript_decoding: tuple[tuple[str, object], ...] = ()
    audio_in_chat: Callable[[nn.Module, object], dict] | None = None

    @property
    def stacks(self) -> dict[str, Stack]:
        """The family's layer stacks by name, encoder first."""
        return {"encoder": self.encoder, **({"decoder": self.decoder} if self.decoder is not None else {})}


DEFAULT_FAMILY = Family()
FAMILIES: dict[str, Family] = {
    "data2vec-audio": Family(position_conv_layers="encoder.pos_conv_embed.layers"),
    "wav2vec2-conformer": Family(depthwise_conv="conv_module.depthwise_conv", pre_norm_field=None, input_norm=None),
    "sew": Family(pooling=Pooling("squeeze_factor", mask="layers", upsample="encoder.upsample")),
    # DeBERTa-style encoder: its relative-position embeddings sit beside the layers and are shared, so they stay
    "sew-d": Family(encoder=Stack("encoder.encoder.layer"),
                    pooling=Pooling("squeeze_factor", mask="encoder.encoder", upsample="encoder.upsample"),
                    layerdrop=(), end_norm="output.LayerNorm", pre_norm_field=None, input_norm=None),
    # log-mel frames stacked in pairs; causal depthwise convolution over masked frames: batch-invariant as is
    "wav2vec2-bert": Family(input_kind="input_features", feature_encoder="feature_projection", per_batch=(),
                            front_end_exact=True, default_features="SeamlessM4TFeatureExtractor",
                            pre_norm_field=None, input_norm=None),
    # FastConformer: 8x conv subsampling of log-mel frames (masked per conv), the relative positions are
    # computed once before the layers and passed to each, so they stay
    "parakeet_ctc": Family(encoder=Stack(config="encoder_config"), input_kind="input_features",
                           output_lengths="_get_subsampling_output_length", feature_encoder="encoder.subsampling",
                           per_batch=(), front_end_exact=True, default_features="ParakeetFeatureExtractor", head="ctc_head",
                           layerdrop_modules=("encoder",), end_norm="norm_out", pre_norm_field=None, input_norm=None),
    # LASR (Google's MedASR): Parakeet's shape (log-mel frames, unpadded strided convs, a conformer whose
    # depthwise conv masks padded frames itself), bias-free LayerNorms
    "lasr_ctc": Family(encoder=Stack(config="encoder_config"), input_kind="input_features",
                       output_lengths="_get_subsampling_output_length", feature_encoder="encoder.subsampler",
                       per_batch=(), front_end_exact=True, default_features="LasrFeatureExtractor", head="ctc_head",
                       layerdrop_modules=("encoder",), end_norm="norm_out", pre_norm_field=None, input_norm=None),
    # encoder-decoder: log-mel frames padded to 30 s, two conv layers, then the encoder's layers; the decoder's
    # layers carry their cache index (``layer_idx``), renumbered when layers go
    "whisper": Family(encoder=Stack("encoder.layers", "encoder_layers"), decoder=Stack("decoder.layers", "decoder_layers", cacheable=False),
                      kind="seq2seq", input_kind="input_features", feature_encoder="encoder.conv1", per_batch=(),
                      front_end_exact=True, default_features="WhisperFeatureExtractor", head="proj_out",
                      auto_class="AutoModelForSpeechSeq2Seq", layerdrop=("encoder_layerdrop", "decoder_layerdrop"),
                      layerdrop_modules=("encoder", "decoder"), end_norm=None, ffn_output="fc2", pre_norm_field=None,
                      input_norm=None, window_read_whole=True),
    # encoder-decoder over raw audio: three unpadded strided convs (a group norm over time after the first),
    # rotary positions, pre-LN layers; the encoder's frame mask keeps every 384th sample of the input mask
    "moonshine": Family(encoder=Stack("encoder.layers", "encoder_num_hidden_layers"),
                        decoder=Stack("decoder.layers", "decoder_num_hidden_layers", cacheable=False),
                        kind="seq2seq", feature_encoder="encoder.conv1",
                        per_batch=("encoder.groupnorm", "encoder.conv2", "encoder.conv3"),
                        conv_front_end=("encoder.conv1", "encoder.conv2", "encoder.conv3"),
                        time_norm=("encoder.groupnorm", 1), subsampled_mask=("encoder", 64 * 3 * 2),
                        default_features="Wav2Vec2FeatureExtractor/raw", head="proj_out",
                        auto_class="AutoModelForSpeechSeq2Seq", layerdrop=(), end_norm=None, ffn_output="mlp.fc2",
                        pre_norm_field=None, input_norm=None, decoder_positions="max_position_embeddings",
                        export_format=""),
}


def _llm(layers: str = "language_model.layers") -> Stack:
    """The LLM decoder of a speech-LLM: its text config's layers, one ``layer_types`` entry each (full or
    sliding-window attention), Qwen2's full-attention prefix count; run once per generated token."""
    return Stack(layers, "num_hidden_layers", config="text_config", cacheable=False, layer_lists=("layer_types",),
                 prefix_counts=("max_window_layers",))


def _voxtral_audio_kwargs(model: nn.Module, processor) -> dict:
    """Voxtral's processor cuts the mel frames into windows of its tower's 2 x ``max_source_positions`` frames
    after padding the audio to whole windows; its defaults are the released checkpoints' 30 s, so the window
    is given from the model's config (a smaller model's own)."""
    frames = 2 * int(model.config.audio_config.max_source_positions)
    hop = int(processor.feature_extractor.hop_length)
    return {"max_source_positions": frames, "pad_to_multiple_of": frames * hop}


def _voxtral_request(model: nn.Module, processor, wave, language: str | None) -> dict:
    """Voxtral's transcription mode (its processor's ``apply_transcription_request``: ``[INST]`` the audio
    ``[/INST]``, ``lang:xx`` when a language is given, ``[TRANSCRIBE]``); the audio handed over as a WAV file
    (16-bit, as the processor writes it)."""
    return processor.apply_transcription_request(
        audio=[wave], model_id=str(getattr(model, "name_or_path", "") or "voxtral"), language=language,
        sampling_rate=int(processor.feature_extractor.sampling_rate), format=["wav"],
        audio_kwargs=_voxtral_audio_kwargs(model, processor))


def _qwen3_asr_request(model: nn.Module, processor, wave, language: str | None) -> dict:
    """Qwen3-ASR's transcription request (its processor's ``apply_transcription_request``: the audio alone in
    the user's turn; with a language, the answer prefilled with ``language <NAME><asr_text>``, so the model
    writes the transcript only)."""
    return processor.apply_transcription_request(wave, language=language)


def _speech_llm(audio: Stack, *, front_end: str, features: str, auto_class: str = "AutoModelForMultimodalLM",
                audio_frames: TowerFrames | None = None, audio_in_chat: Callable | None = None,
                transcript_decoding: tuple[tuple[str, object], ...] = (),
                transcription_request: Callable | None = None) -> Family:
    """A speech-LLM: an audio tower (the ``encoder`` stack) whose outputs a projector turns into the LLM's
    audio-token embeddings, and the LLM's decoder layers (the ``decoder`` stack), prompted to transcribe.
    Repair and LayerDrop are not offered (their sites differ between the two stacks)."""
    return Family(encoder=audio, decoder=_llm(), kind="speechllm", input_kind="input_features", output_lengths=None,
                  feature_encoder=front_end, per_batch=(), front_end_exact=True, default_features=features,
                  auto_class=auto_class, layerdrop=(), end_norm=None, ffn_output=None, pre_norm_field=None,
                  input_norm=None, ffn_extra=None, export_format="", decoder_positions="max_position_embeddings",
                  audio_frames=audio_frames, stack_aliases=("audio", "llm"), audio_in_chat=audio_in_chat,
                  stack_titles=(("encoder", "audio tower"), ("decoder", "LLM")),
                  transcript_decoding=transcript_decoding, transcription_request=transcription_request)


# speech-LLMs: the audio tower is a Whisper-style encoder (Qwen2-Audio, Voxtral, Qwen3-ASR, GLM-ASR) or a
# conformer CTC encoder (Granite Speech), then a projector and an LLM; both stacks prune
FAMILIES.update({
    "qwen2_audio": _speech_llm(Stack("audio_tower.layers", "encoder_layers", config="audio_config"),
                               front_end="audio_tower.conv1", features="WhisperFeatureExtractor",
                               audio_frames=TowerFrames("feature_attention_mask", _whisper_tower_frames)),
    "voxtral": _speech_llm(Stack("audio_tower.layers", "num_hidden_layers", config="audio_config"),
                           front_end="audio_tower.conv1", features="WhisperFeatureExtractor",
                           audio_in_chat=_voxtral_audio_kwargs, transcription_request=_voxtral_request,
                           audio_frames=TowerFrames(None, _windowed_tower_frames, layout="windows")),
    "qwen3_asr": _speech_llm(Stack("audio_tower.layers", "encoder_layers", config="audio_config"),
                             front_end="audio_tower.conv2d1", features="Qwen3ASRFeatureExtractor",
                             audio_frames=TowerFrames("input_features_mask", _chunked_tower_frames, layout="packed"),
                             transcript_decoding=(("return_format", "transcription_only"),),
                             transcription_request=_qwen3_asr_request),
    "glmasr": _speech_llm(Stack("audio_tower.layers", "num_hidden_layers", config="audio_config"),
                          front_end="audio_tower.conv1", features="WhisperFeatureExtractor",
                          audio_frames=TowerFrames("input_features_mask", _padded_conv_tower_frames),
                          transcript_decoding=(("strip_prefix", True),)),
    # the conformer feeds its mid-stack CTC output back after layer depth // 2, and its encoder module keeps
    # its own copy of the depth; the layer cache would be written in place by that feedback, so it is off
    "granite_speech": _speech_llm(Stack("encoder.layers", "num_layers", config="encoder_config", cacheable=False,
                                        depth_copies=(("encoder", "num_layers"),), half_feedback=True),
                                  front_end="encoder.input_linear", features="GraniteSpeechFeatureExtractor"),
    # Granite Speech Plus also concatenates chosen hidden states of the encoder into the projector's input
    "granite_speech_plus": _speech_llm(Stack("encoder.layers", "num_layers", config="encoder_config",
                                             cacheable=False, depth_copies=(("encoder", "num_layers"),),
                                             half_feedback=True, state_indices=("cat_hidden_layers",)),
                                       front_end="encoder.input_linear", features="GraniteSpeechFeatureExtractor"),
})


def family_of(model) -> Family:
    """The family-table entry of ``model`` (by ``config.model_type``; a DDP wrapper's ``.module`` is asked)."""
    model = getattr(model, "module", model)
    return FAMILIES.get(model.config.model_type, DEFAULT_FAMILY)


def family_of_config(config) -> Family:
    """The family-table entry of a model's config, before the model is built."""
    return FAMILIES.get(config.model_type, DEFAULT_FAMILY)


def stack_of(model, stack: str) -> Stack:
    """The table's :class:`Stack` ``stack`` of ``model``; one line naming the stacks it has otherwise."""
    stacks = family_of(model).stacks
    if stack not in stacks:
        raise ComflpError(f"{type(getattr(model, 'module', model)).__name__} has no {stack} layer stack (stacks: "
                          f"{', '.join(stacks)})")
    return stacks[stack]


def resolve_stack(name: str, model=None) -> str:
    """The stack (encoder or decoder) that ``--stack name`` means: a name of :data:`STACKS`, or an alias of
    :data:`STACK_ALIASES`, which ``model`` (when given) must answer to; one line naming its stacks otherwise."""
    stack = STACK_ALIASES.get(name, name)
    if model is None:
        return stack
    family = family_of(model)
    if name in STACK_ALIASES and name not in family.stack_aliases:
        names = {s: [s, *[a for a in family.stack_aliases if STACK_ALIASES[a] == s]] for s in family.stacks}
        raise ComflpError(f"--stack {name} names a speech-LLM's stack; {type(getattr(model, 'module', model)).__name__} "
                          f"has: {', '.join('/'.join(n) for n in names.values())}")
    stack_of(model, stack)  # one line when the model lacks it
    return stack


def stack_config(model, stack: str = "encoder"):
    """The config holding ``stack``'s fields (depth, width): the model's, or the table's sub-config."""
    model = getattr(model, "module", model)
    path = stack_of(model, stack).config
    return getattr(model.config, path) if path else model.config


def encoder_config(model):
    """The config holding the encoder's fields (depth, width, squeeze, LayerDrop)."""
    return stack_config(model, "encoder")


def base_model(model) -> nn.Module:
    """The encoder without a head (the model itself when it has none)."""
    return getattr(model, model.base_model_prefix, model)


def get_module(module: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted ``path`` under ``module``, or None where the path breaks."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def set_module(module: nn.Module, path: str, value: nn.Module) -> None:
    """Put ``value`` at dotted ``path`` under ``module``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(module, parent_path) if parent_path else module, name, value)
