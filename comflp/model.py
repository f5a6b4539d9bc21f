"""Load, inspect, prune and save HuggingFace CTC speech encoders.

Supported: the ``*ForCTC`` families of the family table (:data:`FAMILIES`;
any other whose base model has ``encoder.layers`` is tried as wav2vec2).
Layers are 1-based in the public API. Pruning and switching layers off select
existing modules; nothing is renamed by state-dict index arithmetic, and the
config's depth field follows, so ``save_pretrained`` output reloads anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer, PreTrainedModel
from transformers import Wav2Vec2ForCTC

from .artifacts import write_dir
from .errors import ComflpError
from .paths import DEMO_MODEL_DIR, missing_local_path
from .strategy import validate as validate_strategy

log = logging.getLogger(__name__)

LAYERNORM_HEAD_KEYS = ("lm_head.0.weight", "lm_head.1.weight")


@dataclass(frozen=True)
class Family:
    """What differs between model families; the rest of comflp asks this table, never the family name.

    Paths are dotted attribute paths under the base model (:func:`base_model`).
    ``config``: the sub-config that holds the encoder's fields (Parakeet keeps them in ``encoder_config``);
    ``depth_field`` and the width are read there.
    ``input_kind``: the forward's input, ``input_values`` ([B, T] audio samples) or ``input_features``
    ([B, T, C] frames computed by the feature extractor); the attention mask is at that input's time steps.
    ``output_lengths``: the model's method mapping input lengths to the layers' input frames.
    ``feature_encoder``: the front end between the input and the first layer (frozen when fine-tuning,
    computed once per batch in fine search).
    ``per_batch``: further modules before the first layer whose output depends on the batch only (the feature
    projection, the positional convolution), computed once per batch in fine search beside the front end;
    a path whose module the model does not have (or holds None) is passed over.
    ``position_conv_layers``: the path of a positional convolution built as a stack of conv layers, whose
    padded frames must be zeroed between layers for batching to be exact (see :func:`padding_exact`).
    ``front_end_exact``: the front end gives each utterance of a padded batch what it gives alone (feature
    inputs are computed per utterance by the feature extractor, and these front ends mask padded frames).
    ``depthwise_conv``: the path, inside each layer, of a "same"-padded depthwise convolution over time (a
    conformer's), whose input :func:`padding_exact` zeroes on padded frames, as an utterance alone has
    zeros there.
    ``pooled_mask``: for families that pool frames before their layers (SEW, SEW-D: ``squeeze_field``),
    where the pooled frame mask reaches the layers, ``"layers"`` (a 4-D mask to each layer) or a module
    path taking it as its second argument; :func:`padding_exact` gives them the ``floor(frames / squeeze)``
    pooled frames an utterance has alone (the encoder's max-pooled mask also counts the window that
    straddles its end). ``upsample``: the module that spreads the pooled frames back, whose output past
    ``floor(frames / squeeze) * squeeze`` is zeroed, as the encoder pads a shorter utterance's output.
    ``default_features``: the feature extractor class assumed for a model saved without one.
    ``head``: the output head's attribute on the model (a CTC head, or Whisper's projection).
    ``decoder_layers``, ``decoder_depth_field``: the second layer stack of an encoder-decoder family
    (Whisper), pruned beside the encoder's; ``layers`` and ``depth_field`` then name the encoder's.
    ``auto_class``: the transformers auto class that loads the family.
    ``layerdrop``: the fields of ``config`` that hold the LayerDrop probability; ``layerdrop_modules``: the
    modules (paths under the base model) that copied it when they were built (Whisper's stacks, Parakeet's
    encoder) and read their own ``layerdrop`` when training. A family with neither has no LayerDrop (SEW-D).
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
    """

    layers: str = "encoder.layers"
    config: str | None = None
    depth_field: str = "num_hidden_layers"
    input_kind: str = "input_values"
    output_lengths: str = "_get_feat_extract_output_lengths"
    feature_encoder: str = "feature_extractor"
    per_batch: tuple[str, ...] = ("feature_projection", "encoder.pos_conv_embed")
    position_conv_layers: str | None = None
    front_end_exact: bool = False
    depthwise_conv: str | None = None
    pooled_mask: str | None = None
    upsample: str | None = None
    squeeze_field: str | None = None  # config field: the layers run at 1/squeeze of the encoder's frame rate (SEW)
    default_features: str = "Wav2Vec2FeatureExtractor"
    head: str = "lm_head"
    decoder_layers: str | None = None
    decoder_depth_field: str | None = None
    auto_class: str = "AutoModelForCTC"
    layerdrop: tuple[str, ...] = ("layerdrop",)
    layerdrop_modules: tuple[str, ...] = ()
    end_norm: str | None = "final_layer_norm"
    ffn_output: str | None = "feed_forward.output_dense"
    pre_norm_field: str | None = "do_stable_layer_norm"
    ffn_extra: str | None = "adapter_layer"
    input_norm: str | None = "encoder.layer_norm"
    window_read_whole: bool = False


DEFAULT_FAMILY = Family()
FAMILIES: dict[str, Family] = {
    "data2vec-audio": Family(position_conv_layers="encoder.pos_conv_embed.layers"),
    "wav2vec2-conformer": Family(depthwise_conv="conv_module.depthwise_conv", pre_norm_field=None, input_norm=None),
    "sew": Family(squeeze_field="squeeze_factor", pooled_mask="layers", upsample="encoder.upsample"),
    # DeBERTa-style encoder: its relative-position embeddings sit beside the layers and are shared, so they stay
    "sew-d": Family(layers="encoder.encoder.layer", squeeze_field="squeeze_factor", pooled_mask="encoder.encoder",
                    upsample="encoder.upsample", layerdrop=(), end_norm="output.LayerNorm", pre_norm_field=None,
                    input_norm=None),
    # log-mel frames stacked in pairs; causal depthwise convolution over masked frames: batch-invariant as is
    "wav2vec2-bert": Family(input_kind="input_features", feature_encoder="feature_projection", per_batch=(),
                            front_end_exact=True, default_features="SeamlessM4TFeatureExtractor",
                            pre_norm_field=None, input_norm=None),
    # FastConformer: 8x conv subsampling of log-mel frames (masked per conv), the relative positions are
    # computed once before the layers and passed to each, so they stay
    "parakeet_ctc": Family(config="encoder_config", input_kind="input_features",
                           output_lengths="_get_subsampling_output_length", feature_encoder="encoder.subsampling",
                           per_batch=(), front_end_exact=True, default_features="ParakeetFeatureExtractor", head="ctc_head",
                           layerdrop_modules=("encoder",), end_norm="norm_out", pre_norm_field=None, input_norm=None),
    # encoder-decoder: log-mel frames padded to 30 s, two conv layers, then the encoder's layers; the decoder's
    # layers carry their cache index (``layer_idx``), renumbered when layers go
    "whisper": Family(layers="encoder.layers", depth_field="encoder_layers", input_kind="input_features",
                      feature_encoder="encoder.conv1", per_batch=(), front_end_exact=True,
                      default_features="WhisperFeatureExtractor",
                      head="proj_out", decoder_layers="decoder.layers", decoder_depth_field="decoder_layers",
                      auto_class="AutoModelForSpeechSeq2Seq", layerdrop=("encoder_layerdrop", "decoder_layerdrop"),
                      layerdrop_modules=("encoder", "decoder"), end_norm=None, ffn_output="fc2", pre_norm_field=None,
                      input_norm=None, window_read_whole=True),
}
STACKS = ("encoder", "decoder")


def family_of(model: PreTrainedModel) -> Family:
    """The family-table entry of ``model`` (by ``config.model_type``)."""
    return FAMILIES.get(model.config.model_type, DEFAULT_FAMILY)


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    """True for families with a decoder stack (Whisper)."""
    return family_of(model).decoder_layers is not None


def encoder_config(model: PreTrainedModel):
    """The config holding the encoder's fields (depth, width): the model's, or the family's sub-config."""
    path = family_of(model).config
    return getattr(model.config, path) if path else model.config


class ExtendedWav2Vec2ForCTC(Wav2Vec2ForCTC):
    """Wav2Vec2ForCTC with a LayerNorm before the CTC projection.

    The paper's checkpoint (``kehanlu/mandarin-wav2vec2-aishell1``) stores its
    head as ``lm_head.0`` (LayerNorm) and ``lm_head.1`` (Linear) under a plain
    Wav2Vec2ForCTC config; this is the one class that builds that head.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        width = config.output_hidden_size if getattr(config, "add_adapter", False) else config.hidden_size
        self.lm_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.vocab_size))
        self.post_init()


@dataclass
class LoadedModel:
    """A model with its pre/post-processing; ``tokenizer`` is None when the source has none."""

    model: PreTrainedModel
    feature_extractor: object | None
    tokenizer: object | None
    source: str
    has_ctc_head: bool = True

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)


@dataclass(frozen=True)
class ModelInfo:
    """What ``comflp info`` reports."""

    family: str
    num_layers: int
    num_parameters: int
    hidden_size: int
    vocab_size: int
    head: str
    sampling_rate: int | None
    decoder_layers: int | None = None  # encoder-decoder models: the decoder's layers (num_layers: the encoder's)

    def to_dict(self) -> dict:
        """The fields, without ``decoder_layers`` for a model that has no decoder (a CTC model)."""
        return {k: v for k, v in asdict(self).items() if not (k == "decoder_layers" and v is None)}


def _weight_keys(source: str) -> set[str]:
    """Parameter names stored in a local dir or hub repo, read without loading tensors."""
    from safetensors import safe_open
    from transformers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                    cached_file)

    def fetch(name: str) -> str | None:
        try:
            return cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    if (index := fetch(SAFE_WEIGHTS_INDEX_NAME)) is not None:
        return set(json.loads(Path(index).read_text())["weight_map"])
    if (st := fetch(SAFE_WEIGHTS_NAME)) is not None:
        with safe_open(st, framework="pt") as f:
            return set(f.keys())
    if (index := fetch(WEIGHTS_INDEX_NAME)) is not None:
        return set(json.loads(Path(index).read_text())["weight_map"])
    if (binary := fetch(WEIGHTS_NAME)) is not None:
        try:
            state = torch.load(binary, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped; plain transformers loads it
            state = torch.load(binary, map_location="cpu", weights_only=True)
        return set(state.keys())
    return set()


def has_layernorm_head(source: str) -> bool:
    """True when the stored weights hold the paper's LayerNorm+Linear CTC head."""
    return set(LAYERNORM_HEAD_KEYS) <= _weight_keys(source)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _weights_error(source: str, err: BaseException) -> ComflpError:
    """One line for weights that cannot be read: corrupt safetensors, or a pickle the safe loader refuses."""
    import pickle

    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        return ComflpError(f"the weights in {source} are a pickle that the safe loader refuses for safety "
                           "(torch.load weights_only=True); convert them to safetensors from a trusted copy")
    return ComflpError(f"cannot read the weights in {source}: {_first_line(err)} (corrupt or truncated file?)")


def default_feature_extractor(model: PreTrainedModel) -> object:
    """The feature extractor a model without ``preprocessor_config.json`` most likely used (the family's default).

    For raw-audio families: 16 kHz, zero padding, per-utterance zero-mean unit-variance normalisation (what
    every wav2vec2/HuBERT/WavLM/Data2VecAudio CTC checkpoint on the hub uses); for feature-input families,
    their feature extractor's defaults (what the published checkpoints use).
    """
    import transformers

    name = family_of(model).default_features
    if name == "Wav2Vec2FeatureExtractor":
        return transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                      do_normalize=True, return_attention_mask=True)
    if name == "WhisperFeatureExtractor":  # the window the encoder takes: 2 frames of 10 ms per position
        cfg = model.config
        return transformers.WhisperFeatureExtractor(feature_size=cfg.num_mel_bins,
                                                    chunk_length=cfg.max_source_positions * 2 // 100)
    return getattr(transformers, name)()


def _check_window(model: PreTrainedModel, fe, source: str) -> None:
    """One line when a fixed-window extractor (Whisper's) pads to another length than the encoder takes."""
    frames = getattr(fe, "nb_max_frames", None)
    positions = getattr(model.config, "max_source_positions", None)
    if frames is not None and positions is not None and frames != 2 * positions:
        raise ComflpError(f"{source}: the feature extractor pads to {frames} frames but the encoder takes "
                          f"{2 * positions} (chunk_length {2 * positions // 100} s); save the matching one")


def load_model(source: str | os.PathLike = DEMO_MODEL_DIR, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, need_tokenizer: bool = False,
               need_features: bool = True, need_ctc_head: bool = False,
               allow_encoder_decoder: bool = False) -> LoadedModel:
    """Load a CTC model, its feature extractor and (if present) its tokenizer.

    ``source`` is a local dir or a hub id. The paper's LayerNorm head is
    detected from the weights and built with :class:`ExtendedWav2Vec2ForCTC`.
    A checkpoint without a CTC head (a pretrained-only ``Wav2Vec2Model``)
    loads with ``has_ctc_head=False``; ``need_ctc_head`` refuses it.
    Without ``preprocessor_config.json`` the feature extractor is None when
    ``need_features`` is False (commands that only touch weights), else the
    family default with a warning. An encoder-decoder model (Whisper) is refused unless
    ``allow_encoder_decoder`` (the commands that handle both of its stacks).
    """
    source = str(source)
    if missing_local_path(source):
        raise ComflpError(f"model not found: {source} (no such local dir, and not a hub id: those read name or "
                          "org/name)")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ComflpError(f"cannot load model config from {source}: {_first_line(err)}") from None
    family = FAMILIES.get(config.model_type, DEFAULT_FAMILY)
    if family.decoder_layers and not allow_encoder_decoder:
        raise ComflpError(f"{source} is an encoder-decoder model ({config.model_type}): this step handles CTC "
                          "models only; the comflp commands take it (measure, search and glp with --stack, prune "
                          "with --decoder_layers, demo, finetune, test, measure-report, info)")
    try:
        import transformers

        cls = (ExtendedWav2Vec2ForCTC if has_layernorm_head(source)
               else AutoModelForCTC if family.auto_class == "AutoModelForCTC" else getattr(transformers, family.auto_class))
        model, info = cls.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except ComflpError:
        raise
    except (OSError, ValueError) as err:
        raise ComflpError(f"cannot load {'CTC model' if not family.decoder_layers else 'model'} from {source}: "
                          f"{_first_line(err)}") from None
    except Exception as err:  # safetensors and pickle raise their own types for bad files
        raise _weights_error(source, err) from None
    _check_weights_match_config(model, info, source)
    head = family_of(model).head
    has_head = not any(k.startswith(head + ".") for k in info.get("missing_keys", ()))
    if need_ctc_head and not has_head:
        raise ComflpError(f"{source} has no CTC head ({head}): it is a pretrained-only model; this command "
                          "needs a fine-tuned CTC model")
    try:
        fe = AutoFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError):
        fe = None
        if need_features:
            fe = default_feature_extractor(model)
            log.warning("%s has no preprocessor_config.json: using the family's default feature extractor (%s, "
                        "16 kHz); save the right one beside the model to silence this", source, type(fe).__name__)
    if fe is not None and need_features:  # commands that only touch weights do not feed it
        _check_window(model, fe, source)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is None and need_tokenizer:
        raise ComflpError(f"{source} has no tokenizer (vocab.json); decoding needs one")
    encoder_layers(model)  # fail early on an unsupported architecture
    model.eval().to(device)
    return LoadedModel(model, fe, tok, source, has_head)


def _check_weights_match_config(model: PreTrainedModel, info: dict, source: str) -> None:
    """Refuse a checkpoint whose weights do not fill its config's layer stacks and head.

    transformers initialises missing layers at random and drops surplus ones, with only a load report: a
    config that says 16 layers over weights of 12 would decode through 4 random layers and report a CER.
    ``info``: from_pretrained's loading info (missing and unexpected parameter names).
    """
    import re

    missing, unexpected = set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ()))
    if not missing and not unexpected:
        return
    family = family_of(model)
    for stack in ("encoder", "decoder") if family.decoder_layers else ("encoder",):
        path, depth_field = _stack_fields(model, stack)
        index = re.compile(rf"(?:^|\.){re.escape(path)}\.(\d+)\.")
        lacking = {int(m.group(1)) for k in missing if (m := index.search(k))}
        surplus = {int(m.group(1)) for k in unexpected if (m := index.search(k))}
        if lacking or surplus:
            depth = num_layers(model, stack)
            held = len(set(range(depth)) - lacking) + len(surplus)
            raise ComflpError(f"{source}: config.json says {depth} {stack} layers ({depth_field}), the weights hold "
                              f"{held}; the config and the weights disagree (a hand-edited config.json?)")
    head_keys = sorted(k for k in unexpected if k.split(".")[0] == family.head)
    partial = {k for k in missing if k.split(".")[0] == family.head}
    present = {k for k, _ in model.named_parameters() if k.split(".")[0] == family.head} - partial
    if head_keys or (partial and present):
        raise ComflpError(f"{source}: the weights of the head ({family.head}) do not match config.json "
                          f"({'unexpected ' + head_keys[0] if head_keys else 'missing ' + sorted(partial)[0]})")


def set_layerdrop(model: PreTrainedModel, probability: float) -> bool:
    """Train ``model`` with LayerDrop ``probability`` (its config records it too); False when the family has
    none (the family table's ``layerdrop``)."""
    family = family_of(model)
    if not family.layerdrop:
        return False
    for field in family.layerdrop:
        setattr(encoder_config(model), field, probability)
    for path in family.layerdrop_modules:
        _get(base_model(model), path).layerdrop = probability
    return True


def fingerprint(model: PreTrainedModel) -> str:
    """A content fingerprint of ``model``: sha256 over its config (without where it was loaded from) and every
    tensor of its state (name, dtype, shape, bytes). Two copies of a checkpoint, or one saved again
    elsewhere, match; a generation config does not enter (it does not change the layers measured)."""
    import hashlib

    def content(value):  # the config without where, how and as what it was saved, at every level (sub-configs too)
        if isinstance(value, dict):
            return {k: content(v) for k, v in value.items()
                    if not str(k).startswith("_")
                    and k not in ("transformers_version", "dtype", "torch_dtype", "architectures")}
        return value

    digest = hashlib.sha256()
    digest.update(json.dumps(content(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # raw bytes of any dtype (bfloat16 has no numpy type); a 0-dim buffer (a step count) viewed as 1-dim
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def base_model(model: PreTrainedModel) -> nn.Module:
    """The encoder without a head (the model itself when it has none)."""
    return getattr(model, model.base_model_prefix, model)


def _stack_fields(model: PreTrainedModel, stack: str) -> tuple[str, str]:
    """(layer path, depth field) of ``stack`` ("encoder" or "decoder") in the family table."""
    family = family_of(model)
    if stack == "encoder":
        return family.layers, family.depth_field
    if stack == "decoder" and family.decoder_layers:
        return family.decoder_layers, family.decoder_depth_field
    raise ComflpError(f"{type(model).__name__} has no {stack} layer stack (stacks: "
                      f"{'encoder, decoder' if family.decoder_layers else 'encoder'})")


def _layers_slot(model: PreTrainedModel, stack: str = "encoder") -> tuple[nn.Module, str]:
    """The module holding the layer stack and the attribute name, from the family table's layer path."""
    path = _stack_fields(model, stack)[0]
    parent_path, _, name = path.rpartition(".")
    parent = _get(base_model(model), parent_path) if parent_path else base_model(model)
    if parent is None or not isinstance(getattr(parent, name, None), nn.ModuleList):
        raise ComflpError(f"unsupported model {type(model).__name__}: its base model has no {path}")
    return parent, name


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer layer stack (the family's layer path, e.g. ``base.encoder.layers``), 0-based."""
    parent, name = _layers_slot(model)
    return getattr(parent, name)


def stack_layers(model: PreTrainedModel, stack: str = "encoder") -> nn.ModuleList:
    """The layer stack ``stack`` ("encoder", or "decoder" for encoder-decoder families), 0-based."""
    parent, name = _layers_slot(model, stack)
    return getattr(parent, name)


def num_layers(model: PreTrainedModel, stack: str = "encoder") -> int:
    return len(stack_layers(model, stack))


def _select_layers(model: PreTrainedModel, kept: Sequence[int], stack: str = "encoder"):
    """Make ``stack`` run only layers ``kept`` (0-based, ascending); return an undo function.

    WavLM computes its relative position bias in the first layer only, so when
    that layer goes its bias embedding moves to the new first layer. Modules
    that carry their layer's cache index (``layer_idx``: Whisper's decoder
    attention) get their new position, so cached generation reads and writes
    the right cache slots.
    """
    parent, name = _layers_slot(model, stack)
    old_layers = getattr(parent, name)
    depth_field = _stack_fields(model, stack)[1]
    config = encoder_config(model)
    old_count = getattr(config, depth_field)
    setattr(parent, name, nn.ModuleList([old_layers[i] for i in kept]))
    setattr(config, depth_field, len(kept))
    renumbered = []
    for new, i in enumerate(kept):
        for module in old_layers[i].modules():
            if isinstance(getattr(module, "layer_idx", None), int) and module.layer_idx != new:
                renumbered.append((module, module.layer_idx))
                module.layer_idx = new
    moved = None
    first_attn = getattr(old_layers[0], "attention", None)
    if kept and kept[0] != 0 and hasattr(first_attn, "rel_attn_embed"):
        moved = getattr(parent, name)[0].attention
        moved.rel_attn_embed = first_attn.rel_attn_embed

    def undo() -> None:
        for module, index in renumbered:
            module.layer_idx = index
        if moved is not None:
            del moved.rel_attn_embed
        setattr(parent, name, old_layers)
        setattr(config, depth_field, old_count)

    return undo


@contextlib.contextmanager
def skip_layers(model: PreTrainedModel, pruned: Iterable[int]) -> Iterator[PreTrainedModel]:
    """Run ``model`` with 1-based layers ``pruned`` switched off (no weight copies)."""
    total = num_layers(model)
    pruned = list(pruned)
    if pruned:
        pruned = validate_strategy(pruned, total)
    kept = [i for i in range(total) if i + 1 not in set(pruned)]
    undo = _select_layers(model, kept)
    try:
        yield model
    finally:
        undo()


@contextlib.contextmanager
def run_layers(model: PreTrainedModel, kept: Sequence[int], stack: str = "encoder") -> Iterator[PreTrainedModel]:
    """Run ``model`` through the 0-based layer indices ``kept`` of ``stack`` only, in that order."""
    undo = _select_layers(model, list(kept), stack)
    try:
        yield model
    finally:
        undo()


class _CachedLayer(nn.Module):
    """Runs ``layer`` unless its output for this kept-layer prefix is cached."""

    def __init__(self, layer: nn.Module, key: tuple[int, ...], cache: dict, counter: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.key = key
        self.cache = cache
        self.counter = counter

    def forward(self, *args, **kwargs):
        out = self.cache.get(self.key)
        if out is None:
            out = self.layer(*args, **kwargs)
            self.cache[self.key] = out
            self.counter[0] += 1
        return out


@contextlib.contextmanager
def run_layers_cached(model: PreTrainedModel, kept: Sequence[int], cache: dict, counter: list[int],
                      stack: str = "encoder", *, successor_in_key: bool = False) -> Iterator[PreTrainedModel]:
    """:func:`run_layers`, with the output of each layer application cached under its kept-layer prefix.

    ``cache`` maps a prefix ``kept[: j + 1]`` to the output of layer ``kept[j]`` after that prefix; a
    forward finds the outputs of a prefix it shares with an earlier forward there instead of running
    those layers again (valid while the input batch is the same). ``counter[0]`` counts the layer
    applications actually run. ``successor_in_key``: a layer's output also depends on the layer kept after
    it (a repair map folded at a cut, :mod:`comflp.repair`), so the key is the prefix and that layer (-1 for
    none).
    """
    kept = tuple(kept)

    def key(j: int) -> tuple[int, ...]:
        if not successor_in_key:
            return kept[: j + 1]
        return kept[: j + 1] + (kept[j + 1] if j + 1 < len(kept) else -1,)

    with run_layers(model, kept, stack):
        parent, name = _layers_slot(model, stack)
        selected = getattr(parent, name)
        setattr(parent, name, nn.ModuleList(
            [_CachedLayer(layer, key(j), cache, counter) for j, layer in enumerate(selected)]))
        try:
            yield model
        finally:
            setattr(parent, name, selected)


class _OutputOnce(nn.Module):
    """Stands in for a module before the layers: runs it unless ``outputs`` holds its output under ``key``."""

    def __init__(self, module: nn.Module, outputs: dict, key: str) -> None:
        super().__init__()
        self.module = module
        self.outputs = outputs
        self.key = key

    def forward(self, *args, **kwargs):
        if self.key not in self.outputs:
            self.outputs[self.key] = self.module(*args, **kwargs)
        return self.outputs[self.key]


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(_get(module, parent_path) if parent_path else module, name, value)


@contextlib.contextmanager
def frozen_features(model: PreTrainedModel, outputs: dict | None = None) -> Iterator[PreTrainedModel]:
    """Within the block, the front end and the family's ``per_batch`` modules run once: every forward after
    the first reuses their outputs.

    Valid while every forward in the block gets the same input batch (fine search decodes one batch under
    many layer sets): what runs before the first layer is then the same for every layer set.
    ``outputs``: module path -> output, kept by the caller to reuse them in a later block on the same batch
    (filled in by the first forward).
    """
    base = base_model(model)
    family = family_of(model)
    outputs = {} if outputs is None else outputs
    originals = {}
    for path in (family.feature_encoder, *family.per_batch):
        if (module := _get(base, path)) is not None:
            originals[path] = module
            _set(base, path, _OutputOnce(module, outputs, path))
    try:
        yield model
    finally:
        for path, module in originals.items():
            _set(base, path, module)


def front_end(model: PreTrainedModel) -> nn.Module:
    """The family's front end: the conv feature encoder, feature projection or subsampling before the layers."""
    return _get(base_model(model), family_of(model).feature_encoder)


def freeze_feature_encoder(model: PreTrainedModel) -> None:
    """Stop training the family's front end (the modules before the first layer)."""
    encoder = front_end(model)
    if hasattr(encoder, "_freeze_parameters"):  # wav2vec2's conv encoder also stops asking for input gradients
        encoder._freeze_parameters()
        return
    for p in encoder.parameters():
        p.requires_grad = False


def prune(model: PreTrainedModel, pruned: Iterable[int], *, decoder_pruned: Iterable[int] = ()) -> PreTrainedModel:
    """A new model without the 1-based layers ``pruned`` (and ``decoder_pruned`` of an encoder-decoder model's
    decoder; either may then be empty); ``model`` is left unchanged.

    Whisper's ``generation_config.alignment_heads`` (decoder layer, head) pairs follow the decoder layers
    they name: renumbered, and dropped with a removed layer; when none is left the field goes, with a
    warning that word timestamps will be unavailable.
    """
    plan = {"encoder": list(pruned), "decoder": list(decoder_pruned)}
    if plan["decoder"] and not is_encoder_decoder(model):
        raise ComflpError(f"{type(model).__name__} has no decoder: decoder layers cannot be pruned")
    if not plan["encoder"] and not plan["decoder"]:
        raise ComflpError("no layer to prune")
    new = copy.deepcopy(model)
    for stack, layers in plan.items():
        if not layers:
            continue
        total = num_layers(model, stack)
        layers = validate_strategy(layers, total)
        kept = [i for i in range(total) if i + 1 not in set(layers)]
        _select_layers(new, kept, stack)
        heads = getattr(getattr(new, "generation_config", None), "alignment_heads", None)
        if stack == "decoder" and heads:
            index = {old: j for j, old in enumerate(kept)}
            left = [[index[layer], head] for layer, head in heads if layer in index]
            if left:
                new.generation_config.alignment_heads = left
            else:
                # transformers tests the attribute, not its length: an empty list would fail deep in generate
                del new.generation_config.alignment_heads
                log.warning("decoder layers %s hold every alignment head: the pruned model has none, so word "
                            "timestamps (return_timestamps='word') will be unavailable", ",".join(map(str, layers)))
    return new


def feature_lengths(model: PreTrainedModel, input_lengths: torch.Tensor) -> torch.Tensor:
    """[B] input time steps (audio samples or feature frames) -> [B] encoder frames, by the model's own arithmetic."""
    return getattr(model, family_of(model).output_lengths)(input_lengths).long()


def input_lengths(feature_extractor, samples: torch.Tensor) -> torch.Tensor:
    """[B] audio samples -> [B] time steps of the model input the feature extractor makes of them.

    Raw-audio extractors pass samples through. For the log-mel extractors the counts are their framing in
    closed form (checked against the extractors themselves in the tests); computing features here only to
    count them would cost a spectrogram per utterance.
    """
    samples = torch.as_tensor(samples).long()
    if feature_extractor.model_input_names[0] == "input_values":
        return samples
    name = type(feature_extractor).__name__
    if name == "WhisperFeatureExtractor":  # frames of ceil(n / hop) samples, in the 30-s window it pads to
        frames = torch.div(samples + feature_extractor.hop_length - 1, feature_extractor.hop_length,
                           rounding_mode="floor")
        return frames.clamp(max=feature_extractor.nb_max_frames)
    if name == "ParakeetFeatureExtractor":  # the attention mask covers floor(n / hop) frames
        return torch.div(samples, feature_extractor.hop_length, rounding_mode="floor")
    if name == "SeamlessM4TFeatureExtractor":
        # kaldi fbank frames (25 ms window, 10 ms hop), padded to an even count, stacked by ``stride``; a stack
        # is real when its second frame is
        frames = (torch.div(samples - 400, 160, rounding_mode="floor") + 1).clamp(min=0)
        stride = feature_extractor.stride
        stacks = torch.div(torch.div(frames + 1, 2, rounding_mode="floor") * 2, stride, rounding_mode="floor")
        return torch.minimum(stacks, torch.div(frames + stride - 2, stride, rounding_mode="floor")).clamp(min=0)
    raise ComflpError(f"comflp does not know how {name} frames audio; supported: raw audio, "
                      "ParakeetFeatureExtractor, SeamlessM4TFeatureExtractor")


def encoder_frames(model: PreTrainedModel, feature_extractor, samples: torch.Tensor) -> torch.Tensor:
    """[B] audio samples -> [B] encoder frames (input framing, then the model's front end)."""
    steps = input_lengths(feature_extractor, samples)
    return torch.where(steps > 0, feature_lengths(model, steps.clamp(min=1)), torch.zeros_like(steps))


def min_audio_samples(model: PreTrainedModel, feature_extractor) -> int:
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


def frame_mask(model: PreTrainedModel, attention_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, T_input] input mask -> [B, num_frames] bool mask of real encoder frames."""
    lengths = feature_lengths(model, attention_mask.sum(-1))
    return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]


def layer_frame_mask(model: PreTrainedModel, attention_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, T_input] input mask -> [B, num_frames] bool mask of the real frames the layers see.

    The layers' frame rate is the encoder's, or 1/squeeze of it for families that pool before their layers
    (SEW: floor(frames / squeeze), the pooled frames an utterance has alone; in a batch the window that
    straddles its end mixes in padding and is not counted).
    """
    lengths = _layer_lengths(model, attention_mask.sum(-1))
    return torch.arange(num_frames, device=attention_mask.device)[None, :] < lengths[:, None]


def _layer_lengths(model: PreTrainedModel, input_lengths: torch.Tensor) -> torch.Tensor:
    """[B] input time steps -> [B] frames at the layers' rate (see :func:`layer_frame_mask`)."""
    lengths = feature_lengths(model, input_lengths)
    field = family_of(model).squeeze_field
    if field:
        squeeze = int(getattr(encoder_config(model), field))
        lengths = torch.div(lengths, squeeze, rounding_mode="floor")
    return lengths


class _UnpaddedFeatureEncoder(nn.Module):
    """The conv feature encoder run on each utterance's real samples, outputs zero-padded in time.

    Group norm in the first conv layer normalises over time, so running it on a
    zero-padded batch changes every shorter utterance's features; running it
    per utterance (utterances of equal length together) gives each utterance
    the features it has alone. input: [B, T] -> [B, C, F_max].
    """

    def __init__(self, encoder: nn.Module, lengths: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.lengths = [int(n) for n in lengths]

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            groups.setdefault(n, []).append(i)
        outputs: dict[int, torch.Tensor] = {}
        for n, rows in groups.items():
            out = self.encoder(input_values[rows, :n])
            outputs.update((i, out[j]) for j, i in enumerate(rows))
        width = max(o.shape[-1] for o in outputs.values())
        return torch.stack([nn.functional.pad(outputs[i], (0, width - outputs[i].shape[-1]))
                            for i in range(len(self.lengths))])


class _MaskedGroupNorm(nn.Module):
    """``norm`` (an nn.GroupNorm over [B, C, T]) with statistics over each utterance's real frames only.

    Group norm normalises over time, so on a zero-padded batch every shorter
    utterance would be normalised with its padding; here frame t of utterance
    b counts only if t < lengths[b], which is what that utterance gets alone.
    Padded frames come out as garbage, which later layers never read for real
    frames (unpadded strided convs) and the encoder zeroes.
    """

    def __init__(self, norm: nn.GroupNorm, lengths: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.lengths = lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        g = self.norm.num_groups
        mask = (torch.arange(t, device=x.device)[None, :] < self.lengths.to(x.device)[:, None]).to(x.dtype)
        w = (mask / mask.sum(-1, keepdim=True).clamp(min=1.0))[:, :, None]  # [B, T, 1]: mean over real frames
        # per-channel moments by batched matmul (one read of x), pooled to groups
        mean = torch.bmm(x, w).reshape(b, g, c // g).mean(-1, keepdim=True)  # [B, G, 1]
        centred = x.reshape(b, g, c // g, t) - mean[..., None]
        var = torch.bmm(centred.reshape(b, c, t).square(), w).reshape(b, g, c // g).mean(-1, keepdim=True)
        scale = torch.rsqrt(var + self.norm.eps)  # [B, G, 1]
        if self.norm.affine:
            scale = scale.expand(b, g, c // g).reshape(b, c, 1) * self.norm.weight[None, :, None]
            return torch.addcmul(self.norm.bias[None, :, None], centred.reshape(b, c, t), scale)
        return (centred * scale[..., None]).reshape(b, c, t)


def _conv_stack(encoder: nn.Module) -> list[tuple[nn.Module, nn.Conv1d]] | None:
    """(layer, conv) per conv layer of a wav2vec2-style feature encoder (norm at ``layer.layer_norm``), or None.

    Only unpadded convs qualify: then a real output frame reads real input samples only.
    """
    layers = getattr(encoder, "conv_layers", None)
    if not isinstance(layers, nn.ModuleList):
        return None
    out = []
    for layer in layers:
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, nn.Conv1d) or conv.padding not in ((0,), 0) or conv.dilation != (1,):
            return None
        out.append((layer, conv))
    return out


def _zero_padded_input(mask: torch.Tensor):
    """A forward pre-hook zeroing the padded frames of a module's [B, C, T] input (mask: [B, T] bool)."""
    def hook(module, args):
        x = args[0]
        return (x * mask[:, None, : x.shape[-1]].to(x.dtype), *args[1:])
    return hook


def _zero_padded_output(mask: torch.Tensor):
    """A forward hook zeroing the padded frames of a module's [B, C, T] output (mask: [B, T] bool)."""
    def hook(module, args, output):
        return output * mask[:, None, : output.shape[-1]].to(output.dtype)
    return hook


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _pooled_mask_hooks(model: PreTrainedModel, base: nn.Module, family: Family, sample_lengths: torch.Tensor,
                       device) -> list:
    """Hooks giving a pooling family's layers the ``floor(frames / squeeze)`` pooled frames each utterance has
    alone, and zeroing the upsampled output past ``floor(frames / squeeze) * squeeze`` (see ``Family``)."""
    from transformers.masking_utils import create_bidirectional_mask

    pooled = _layer_lengths(model, sample_lengths).to(device)
    mask = (torch.arange(int(pooled.max()) + 1, device=device)[None, :] < pooled[:, None]).long()  # [B, T] pooled
    hooks = []
    if family.pooled_mask == "layers":
        def layer_mask(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["attention_mask"] = create_bidirectional_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=mask[:, : hidden.shape[1]])
            return args, kwargs

        hooks += [layer.register_forward_pre_hook(layer_mask, with_kwargs=True) for layer in encoder_layers(model)]
    else:
        def encoder_mask(module, args, kwargs):  # (hidden_states, attention_mask, ...)
            hidden = args[0] if args else kwargs["hidden_states"]
            if len(args) > 1:
                args = (args[0], mask[:, : hidden.shape[1]], *args[2:])
            else:
                kwargs["attention_mask"] = mask[:, : hidden.shape[1]]
            return args, kwargs

        hooks.append(_get(base, family.pooled_mask).register_forward_pre_hook(encoder_mask, with_kwargs=True))
    frames = pooled * int(getattr(encoder_config(model), family.squeeze_field))

    def zero_tail(module, args, output):  # [B, T, D]: the frames an utterance alone does not have
        keep = torch.arange(output.shape[1], device=output.device)[None, :] < frames[:, None]
        return output * keep[..., None].to(output.dtype)

    hooks.append(_get(base, family.upsample).register_forward_hook(zero_tail))
    return hooks


@contextlib.contextmanager
def padding_exact(model: PreTrainedModel, sample_lengths: Sequence[int]) -> Iterator[PreTrainedModel]:
    """Within the block, a padded batch gives each utterance what it gives alone.

    Everything that reads padding in the encoders comflp supports is switched
    off here:

    - group norm in the conv feature encoder normalises over time: it is
      replaced by :class:`_MaskedGroupNorm` (statistics over real frames),
      or, for a feature encoder of another shape, the encoder runs on each
      utterance unpadded (:class:`_UnpaddedFeatureEncoder`);
    - in families whose positional convolution is a stack of conv layers (the
      family table's ``position_conv_layers``), padded frames between those
      layers are zeroed, as the unpadded convolution's own zero padding would be;
    - in conformer layers (the family table's ``depthwise_conv``), the depthwise
      convolution's input is zeroed on padded frames for the same reason;
    - in families that pool frames before their layers (SEW, SEW-D), the layers
      get the ``floor(frames / squeeze)`` pooled frames an utterance has alone
      (the encoder's max-pooled mask also counts the window straddling its end)
      and the upsampled frames past them are zeroed (``pooled_mask``, ``upsample``).

    Feature-input families (``front_end_exact``) need neither: their features are computed per utterance
    and their front ends mask padded frames. ``sample_lengths`` are the input's real time steps (samples,
    or feature frames). Attention itself is masked exactly by the frame attention mask.
    """
    inner = getattr(model, "module", model)  # under DDP the HF model is the wrapper's .module
    base = base_model(inner)
    family = family_of(inner)
    device = next(inner.parameters()).device
    restore: list[tuple[object, str, object]] = []  # (owner, attribute, original)
    encoder = _get(base, family.feature_encoder)
    stack = _conv_stack(encoder)
    if family.front_end_exact:
        pass
    elif stack is not None:
        lengths = torch.as_tensor(list(sample_lengths))
        for layer, conv in stack:
            lengths = torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.GroupNorm):
                restore.append((layer, "layer_norm", norm))
                layer.layer_norm = _MaskedGroupNorm(norm, lengths.clamp(min=0).to(device))
    else:
        parent_path, _, name = family.feature_encoder.rpartition(".")
        restore.append((_get(base, parent_path) if parent_path else base, name, encoder))
        _set(base, family.feature_encoder, _UnpaddedFeatureEncoder(encoder, sample_lengths))
    hooks = []  # forward hooks removed on exit
    conv_stack = _get(base, family.position_conv_layers) if family.position_conv_layers else None
    if conv_stack is not None:
        frames = feature_lengths(inner, torch.as_tensor(list(sample_lengths)))
        mask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).to(device)
        hooks += [layer.register_forward_hook(_zero_padded_output(mask)) for layer in conv_stack]
    if family.pooled_mask:
        hooks += _pooled_mask_hooks(inner, base, family, torch.as_tensor(list(sample_lengths)), device)
    if family.depthwise_conv:
        frames = _layer_lengths(inner, torch.as_tensor(list(sample_lengths)))
        mask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).to(device)
        hooks += [_get(layer, family.depthwise_conv).register_forward_pre_hook(_zero_padded_input(mask))
                  for layer in encoder_layers(inner)]
    try:
        yield model
    finally:
        for handle in hooks:
            handle.remove()
        for owner, key, original in reversed(restore):
            setattr(owner, key, original)


class ExactForExport(nn.Module):
    """A CTC model as one graph ``(inputs, attention_mask) -> logits`` that a tracer can export, batch-invariant
    where :func:`padding_exact` can be written in tensors alone (``exact``).

    That is the conv feature encoder's group norm (:class:`_MaskedGroupNorm`, its lengths computed from the
    attention mask inside the graph) and the feature-input families' front ends (exact as they are). The
    other readers of padding (a positional conv stack, a conformer's depthwise conv, SEW's pooling, an
    encoder run per utterance) are Python-side hooks and loops a graph cannot hold: for those families
    ``exact`` is False and the graph is the paper's batching, ``forward(..., pad_audio=True)`` (one utterance
    per run: exact).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        family = family_of(model)
        encoder = _get(base_model(model), family.feature_encoder)
        stack = _conv_stack(encoder) or []
        self.exact = family.front_end_exact or (
            bool(stack) and not (family.position_conv_layers or family.depthwise_conv or family.pooled_mask))
        # a family the graph cannot make exact runs as the paper's batching throughout (the group norm too),
        # so that its graph is one known thing: ``forward(..., pad_audio=True)``
        self.stack = stack if self.exact and not family.front_end_exact else []
        self.masked: list[_MaskedGroupNorm | None] = []
        for layer, _ in self.stack:
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.GroupNorm):
                layer.layer_norm = norm = _MaskedGroupNorm(norm, torch.zeros(1, dtype=torch.long))
            self.masked.append(norm if isinstance(norm, _MaskedGroupNorm) else None)
        self.model = model

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(-1)
        for (_, conv), norm in zip(self.stack, self.masked):
            lengths = torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
            if norm is not None:
                norm.lengths = lengths.clamp(min=0)
        return call(self.model, inputs, attention_mask).logits


def call(model: PreTrainedModel, inputs: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """``model``'s own forward, with ``inputs`` passed as the family's input kind (``input_values``/``input_features``).

    An encoder-decoder model without decoder inputs (``labels`` or ``decoder_input_ids``) runs its encoder only.
    """
    inner = getattr(model, "module", model)  # under DDP the HF model is the wrapper's .module
    kind = family_of(inner).input_kind
    if is_encoder_decoder(inner) and "labels" not in kwargs and "decoder_input_ids" not in kwargs:
        return inner.get_encoder()(**{kind: inputs}, attention_mask=attention_mask, **kwargs)
    return model(**{kind: inputs}, attention_mask=attention_mask, **kwargs)


def forward(model: PreTrainedModel, inputs: torch.Tensor, attention_mask: torch.Tensor, *,
            pad_audio: bool = False, **kwargs):
    """The model's forward on a padded batch, with results independent of the batching.

    inputs: [B, T] zero-padded audio, or [B, T, C] padded feature frames for feature-input families;
    attention_mask: [B, T] (1 = real sample or frame). By default the model runs under
    :func:`padding_exact`, so every utterance gets (up to float rounding) the output it gets alone.
    ``pad_audio=True`` is the paper's behaviour: the padded batch goes through the model as is, and
    group-norm encoders then give results that depend on which utterances share a batch.
    """
    if pad_audio:
        return call(model, inputs, attention_mask, **kwargs)
    with padding_exact(model, attention_mask.sum(-1).tolist()):
        return call(model, inputs, attention_mask, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(loaded: LoadedModel) -> ModelInfo:
    model = loaded.model
    cfg = model.config
    head = "none" if not loaded.has_ctc_head else (
        "layernorm+linear" if isinstance(model, ExtendedWav2Vec2ForCTC) else "linear")
    return ModelInfo(
        family=cfg.model_type,
        num_layers=num_layers(model),
        num_parameters=count_parameters(model if loaded.has_ctc_head else base_model(model)),
        hidden_size=encoder_config(model).hidden_size,
        vocab_size=cfg.vocab_size,
        head=head,
        sampling_rate=getattr(loaded.feature_extractor, "sampling_rate", None),
        decoder_layers=num_layers(model, "decoder") if is_encoder_decoder(model) else None,
    )


def prune_layer_weights(weights: dict[str, torch.Tensor], model: PreTrainedModel,
                        kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """Weights named like ``model``'s parameters (an MMS ``adapter.<lang>.safetensors``), for the kept layers only.

    kept: the source layers kept, 0-based ascending. A key under the layer stack (``wav2vec2.encoder.layers.<i>.``)
    is dropped when layer i goes and renumbered to its new position otherwise; other keys (the adapter's
    ``lm_head``) are kept as they are.
    """
    layers = encoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) in new_index:
            out[f"{prefix}{new_index[int(index)]}.{rest}"] = value
    return out


def adapter_files(source: str | os.PathLike) -> list[Path]:
    """The MMS language-adapter files (``adapter.<lang>.safetensors``) beside a local model."""
    return sorted(Path(source).glob("adapter.*.safetensors")) if Path(source).is_dir() else []


def save_model(model: PreTrainedModel, out_dir: str | os.PathLike, *, feature_extractor=None, tokenizer=None,
               dtype: torch.dtype | None = None, overwrite: bool = False, flag: str = "--output",
               extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
               extra_json: dict[str, dict] | None = None, extra_text: dict[str, str] | None = None) -> Path:
    """Save in HF format (config + model.safetensors + processor files), atomically.

    ``extra_weights``: more safetensors files to write beside the model (file name -> tensors), e.g. pruned
    MMS adapter files. ``extra_json``: JSON records to write beside it (file name -> object), e.g. a repair's.
    ``extra_text``: text files (file name -> text), e.g. the model card and its record
    (:func:`comflp.modelcard.card_files`).

    The model is written to a temp dir beside ``out_dir`` and renamed into
    place; an existing ``out_dir`` is replaced only if comflp wrote it and
    ``overwrite`` is set (:func:`comflp.artifacts.write_dir`).
    """
    out_dir = Path(out_dir)
    with write_dir(out_dir, kind="model", overwrite=overwrite, flag=flag) as tmp:
        to_save = model if dtype is None else copy.deepcopy(model).to(dtype)
        to_save.save_pretrained(tmp)
        if feature_extractor is not None:
            feature_extractor.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, tensors in (extra_weights or {}).items():
            from safetensors.torch import save_file

            save_file({k: (v if dtype is None or not v.is_floating_point() else v.to(dtype)).contiguous()
                       for k, v in tensors.items()}, str(tmp / name))
        for name, record in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name, text in (extra_text or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir
