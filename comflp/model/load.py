"""Load a model with its processor, check it, fingerprint it and describe it.

Supported: the families of the family table (:data:`.families.FAMILIES`; any other whose base model has
``encoder.layers`` is tried as wav2vec2). The paper's checkpoint stores a LayerNorm+Linear CTC head, built
here by :class:`ExtendedWav2Vec2ForCTC`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer, PreTrainedModel
from transformers import Wav2Vec2ForCTC

from ..errors import ComflpError, first_line
from ..paths import DEMO_MODEL_DIR, missing_local_path
from .families import base_model, encoder_config, family_of, family_of_config, stack_config
from .frames import default_feature_extractor
from .layers import count_parameters, num_layers, stack_layers

log = logging.getLogger(__name__)

LAYERNORM_HEAD_KEYS = ("lm_head.0.weight", "lm_head.1.weight")


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


def _weights_error(source: str, err: BaseException) -> ComflpError:
    """One line for weights that cannot be read: corrupt safetensors, or a pickle the safe loader refuses."""
    import pickle

    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        return ComflpError(f"the weights in {source} are a pickle that the safe loader refuses for safety "
                           "(torch.load weights_only=True); convert them to safetensors from a trusted copy")
    return ComflpError(f"cannot read the weights in {source}: {first_line(err)} (corrupt or truncated file?)")


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
        raise ComflpError(f"cannot load model config from {source}: {first_line(err)}") from None
    family = family_of_config(config)
    if "decoder" in family.stacks and not allow_encoder_decoder:
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
        raise ComflpError(f"cannot load {'CTC model' if 'decoder' not in family.stacks else 'model'} from {source}: "
                          f"{first_line(err)}") from None
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
    except ImportError as err:  # an extractor needing a library not installed here (Granite's: torchaudio)
        fe = None
        if need_features and family.kind != "speechllm":  # a speech-LLM's processor says it below
            raise ComflpError(f"{source}: its feature extractor needs a library that is not installed "
                              f"({first_line(err)})") from None
    if family.kind == "speechllm":  # its processor builds the prompt around the audio and decodes the text
        try:
            tok = _processor(source)
        except ComflpError:
            if need_tokenizer:
                raise
            tok = None  # a command that only touches weights (prune, info) does without it
        if tok is None and need_tokenizer:
            raise ComflpError(f"{source} has no processor (processor_config.json with its tokenizer and chat "
                              "template); decoding a speech-LLM needs one")
        fe = tok.feature_extractor if tok is not None else fe
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            tok = None
        outputs = getattr(model.config, "vocab_size", None)
        if tok is not None and isinstance(outputs, int) and len(tok) < outputs / 2:
            # transformers 5 builds an empty tokenizer of the config's class when no tokenizer file is there:
            # every token would decode to nothing (a 100% error rate that looks like a result)
            log.warning("%s: its tokenizer knows %d tokens for the model's %d outputs: no tokenizer files?",
                        source, len(tok), outputs)
            tok = None
        if tok is None and need_tokenizer:
            raise ComflpError(f"{source} has no tokenizer (vocab.json or tokenizer.json) for its {outputs} outputs; "
                              "decoding needs one")
    if fe is None and need_features:
        try:
            fe = default_feature_extractor(model)
        except ImportError as err:
            raise ComflpError(f"{source} has no preprocessor_config.json, and the family's default feature "
                              f"extractor needs a library that is not installed ({first_line(err)})") from None
        log.warning("%s has no preprocessor_config.json: using the family's default feature extractor (%s, "
                    "16 kHz); save the right one beside the model to silence this", source, type(fe).__name__)
    if fe is not None and need_features:  # commands that only touch weights do not feed it
        _check_window(model, fe, source)
    stack_layers(model)  # fail early on an unsupported architecture
    model.eval().to(device)
    return LoadedModel(model, fe, tok, source, has_head)


def _processor(source: str):
    """A speech-LLM's processor (feature extractor, tokenizer, chat template), or None when it has none."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except ImportError as err:  # e.g. Voxtral's tokenizer is mistral_common's, an optional library
        raise ComflpError(f"{source}: its processor needs a library that is not installed ({first_line(err)}); "
                          "Voxtral's: pip install 'comflp[voxtral]' (mistral_common)") from None
    except (OSError, ValueError, TypeError, KeyError) as err:
        if (Path(source) / "processor_config.json").is_file():  # there, but unreadable: say why
            raise ComflpError(f"{source}: cannot load its processor ({type(err).__name__}: {first_line(err)})") from None
        return None
    if not hasattr(processor, "tokenizer"):
        return None
    if not hasattr(processor, "feature_extractor"):  # Granite Speech's is an ``audio_processor``
        raise ComflpError(f"{source}: comflp reads a speech-LLM's audio through its processor's feature extractor, "
                          f"and {type(processor).__name__} has none (Granite Speech's audio processor, which "
                          "needs torchaudio, is not supported yet); it can still be pruned (comflp prune)")
    return processor


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
    for stack, fields in family.stacks.items():
        path, depth_field = fields.layers, fields.depth_field
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


def _width(config) -> int:
    """A stack's width: ``hidden_size`` (or the config's alias of it), Granite's conformer ``hidden_dim``."""
    width = getattr(config, "hidden_size", None)
    return int(width if width is not None else config.hidden_dim)


def model_info(loaded: LoadedModel) -> ModelInfo:
    model = loaded.model
    cfg = model.config
    head = "none" if not loaded.has_ctc_head else (
        "layernorm+linear" if isinstance(model, ExtendedWav2Vec2ForCTC) else "linear")
    return ModelInfo(
        family=cfg.model_type,
        num_layers=num_layers(model),
        num_parameters=count_parameters(model if loaded.has_ctc_head else base_model(model)),
        hidden_size=_width(encoder_config(model)),
        # a speech-LLM's vocabulary is its text config's
        vocab_size=getattr(cfg, "vocab_size", None) or stack_config(model, "decoder").vocab_size,
        head=head,
        sampling_rate=getattr(loaded.feature_extractor, "sampling_rate", None),
        decoder_layers=num_layers(model, "decoder") if "decoder" in family_of(model).stacks else None,
    )
