"""How audio becomes frames: input time steps per feature extractor, encoder frames, frame masks.

What differs between feature extractors (how many input steps an utterance gives, and the extractor a model
saved without one most likely used) is one table, :data:`EXTRACTORS`, keyed by the extractor's class name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ComflpError
from .families import base_model, encoder_config, family_of, get_module


def _whisper_frames(fe, samples: torch.Tensor) -> torch.Tensor:
    """Frames of ceil(n / hop) samples, in the 30-s window the extractor pads to."""
    frames = torch.div(samples + fe.hop_length - 1, fe.hop_length, rounding_mode="floor")
    return frames.clamp(max=fe.nb_max_frames)


def _parakeet_frames(fe, samples: torch.Tensor) -> torch.Tensor:
    """The attention mask covers floor(n / hop) frames."""
    return torch.div(samples, fe.hop_length, rounding_mode="floor")


def _seamless_frames(fe, samples: torch.Tensor) -> torch.Tensor:
    """Kaldi fbank frames (25 ms window, 10 ms hop), padded to an even count, stacked by ``stride``; a stack
    is real when its second frame is."""
    frames = (torch.div(samples - 400, 160, rounding_mode="floor") + 1).clamp(min=0)
    stride = fe.stride
    stacks = torch.div(torch.div(frames + 1, 2, rounding_mode="floor") * 2, stride, rounding_mode="floor")
    return torch.minimum(stacks, torch.div(frames + stride - 2, stride, rounding_mode="floor")).clamp(min=0)


def _lasr_frames(fe, samples: torch.Tensor) -> torch.Tensor:
    """Frames of ``win_length`` samples every ``hop_length`` (no centring): floor((n - win) / hop) + 1."""
    frames = torch.div(samples - fe.win_length, fe.hop_length, rounding_mode="floor") + 1
    return frames.clamp(min=0)


def _qwen3_asr_frames(fe, samples: torch.Tensor) -> torch.Tensor:
    """Mel frames of an utterance as Qwen3-ASR's processor extracts it alone (padding to its own length): clips
    shorter than ``min_length`` samples are zero-padded to it first (counted as real, as the original does),
    then every ``hop_length``-th sample's mask is kept, the last dropped when it is partial: floor(n' / hop)."""
    return torch.div(samples.clamp(min=int(getattr(fe, "min_length", 0) or 0)), fe.hop_length, rounding_mode="floor")


def _raw_audio_default(model):
    """16 kHz raw samples as they are (no normalisation), zero padding: Moonshine's checkpoints."""
    import transformers

    return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                  do_normalize=False, return_attention_mask=True)


def _wav2vec2_default(model):
    """16 kHz, zero padding, per-utterance zero-mean unit-variance normalisation: what every
    wav2vec2/HuBERT/WavLM/Data2VecAudio CTC checkpoint on the hub uses."""
    import transformers

    return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                  do_normalize=True, return_attention_mask=True)


def _whisper_default(model):
    """The window the encoder takes: 2 frames of 10 ms per position (30 s for an encoder without a fixed
    window), the encoder's mel bins (a speech-LLM's audio tower's)."""
    import transformers

    cfg = encoder_config(model)
    positions = getattr(cfg, "max_source_positions", 1500)
    return transformers.WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=positions * 2 // 100)


def _qwen3_asr_default(model):
    """Qwen3-ASR's extractor with the audio tower's mel bins and chunk (2 x ``n_window`` frames)."""
    import transformers

    cfg = encoder_config(model)
    return transformers.Qwen3ASRFeatureExtractor(feature_size=cfg.num_mel_bins, n_window=cfg.n_window)


@dataclass(frozen=True)
class Extractor:
    """A feature extractor class as comflp knows it.

    ``frames``: (extractor, [B] audio samples) -> [B] input time steps, in closed form (checked against the
    extractors themselves in the tests; computing features only to count them would cost a spectrogram per
    utterance); None: the input is the audio itself. ``default``: model -> the extractor with the settings
    published checkpoints of the family use, for a model saved without one (None: the class's defaults).
    """

    frames: Callable | None = None
    default: Callable | None = None


EXTRACTORS: dict[str, Extractor] = {
    "Wav2Vec2FeatureExtractor": Extractor(default=_wav2vec2_default),
    "Wav2Vec2FeatureExtractor/raw": Extractor(default=_raw_audio_default),  # the same class, unnormalised
    "WhisperFeatureExtractor": Extractor(frames=_whisper_frames, default=_whisper_default),
    "ParakeetFeatureExtractor": Extractor(frames=_parakeet_frames),
    "SeamlessM4TFeatureExtractor": Extractor(frames=_seamless_frames),
    "LasrFeatureExtractor": Extractor(frames=_lasr_frames),
    "Qwen3ASRFeatureExtractor": Extractor(frames=_qwen3_asr_frames, default=_qwen3_asr_default),
}


def default_feature_extractor(model) -> object:
    """The feature extractor a model without ``preprocessor_config.json`` most likely used: the family's
    default (the table's ``default_features``), with the settings of :data:`EXTRACTORS`."""
    import transformers

    name = family_of(model).default_features
    build = EXTRACTORS.get(name, Extractor()).default
    return build(model) if build is not None else getattr(transformers, name)()


def conv_lengths(convs, input_lengths: torch.Tensor) -> torch.Tensor:
    """[B] input steps -> [B] output frames of a chain of unpadded, undilated 1-d convs: each maps n to
    floor((n - kernel) / stride) + 1 (no output below 0)."""
    lengths = torch.as_tensor(input_lengths).long()
    for conv in convs:
        lengths = (torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1).clamp(min=0)
    return lengths


def feature_lengths(model, input_lengths: torch.Tensor) -> torch.Tensor:
    """[B] input time steps (audio samples or feature frames) -> [B] encoder frames, by the model's own
    arithmetic (a front end of plain convs, the table's ``conv_front_end``: by their kernels and strides)."""
    model = getattr(model, "module", model)
    family = family_of(model)
    if family.conv_front_end:
        return conv_lengths([get_module(base_model(model), path) for path in family.conv_front_end], input_lengths)
    if family.output_lengths is None:  # counted at the input's rate (see Family.output_lengths)
        return torch.as_tensor(input_lengths).long()
    return getattr(model, family.output_lengths)(input_lengths).long()


def input_lengths(feature_extractor, samples: torch.Tensor) -> torch.Tensor:
    """[B] audio samples -> [B] time steps of the model input the feature extractor makes of them.

    Raw-audio extractors pass samples through; the others count by :data:`EXTRACTORS`.
    """
    samples = torch.as_tensor(samples).long()
    if feature_extractor.model_input_names[0] == "input_values":
        return samples
    name = type(feature_extractor).__name__
    framing = EXTRACTORS.get(name, Extractor()).frames
    if framing is None:
        known = ", ".join(n for n, e in EXTRACTORS.items() if e.frames is not None)
        raise ComflpError(f"comflp does not know how {name} frames audio; supported: raw audio, {known}")
    return framing(feature_extractor, samples)


def encoder_frames(model, feature_extractor, samples: torch.Tensor) -> torch.Tensor:
    """[B] audio samples -> [B] encoder frames (input framing, then the model's front end)."""
    steps = input_lengths(feature_extractor, samples)
    return torch.where(steps > 0, feature_lengths(model, steps.clamp(min=1)), torch.zeros_like(steps))


def min_audio_samples(model, feature_extractor) -> int:
    """The fewest audio samples that give one encoder frame (the front end's receptive field)."""

    def frames(n: int) -> int:
        return int(encoder_frames(model, feature_extractor, torch.tensor([n]))[0])

    n = 1
    while frames(n) < 1:
        n *= 2
    lo, hi = n // 2, n
    while hi - lo > 1:  # smallest n with >= 1 frame, in (lo, hi]
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if frames(mid) >= 1 else (mid, hi)
    return hi


def frame_mask(model, attention_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, T_input] input mask -> [B, num_frames] bool mask of real encoder frames."""
    lengths = feature_lengths(model, attention_mask.sum(-1))
    return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]


def layer_lengths(model, input_lengths: torch.Tensor) -> torch.Tensor:
    """[B] input time steps -> [B] frames at the layers' rate (see :func:`layer_frame_mask`)."""
    lengths = feature_lengths(model, input_lengths)
    pooling = family_of(model).pooling
    if pooling is not None:
        squeeze = int(getattr(encoder_config(model), pooling.squeeze_field))
        lengths = torch.div(lengths, squeeze, rounding_mode="floor")
    return lengths


def layer_frame_mask(model, attention_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, T_input] input mask -> [B, num_frames] bool mask of the real frames the layers see.

    The layers' frame rate is the encoder's, or 1/squeeze of it for families that pool before their layers
    (SEW: floor(frames / squeeze), the pooled frames an utterance has alone; in a batch the window that
    straddles its end mixes in padding and is not counted).
    """
    lengths = layer_lengths(model, attention_mask.sum(-1))
    return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]
