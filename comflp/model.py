"""Load, inspect, prune and save HuggingFace CTC speech encoders.

Supported: any ``*ForCTC`` model whose base model has ``encoder.layers``
(Wav2Vec2, HuBERT, WavLM, Data2VecAudio, ...). Layers are 1-based in the
public API. Pruning and switching layers off select existing modules; nothing
is renamed by state-dict index arithmetic, and ``config.num_hidden_layers``
follows, so ``save_pretrained`` output reloads anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer, PreTrainedModel
from transformers import Wav2Vec2ForCTC

from .atomic import atomic_dir
from .errors import ComflpError
from .paths import DEMO_MODEL_DIR
from .strategy import validate as validate_strategy

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
    feature_extractor: object
    tokenizer: object | None
    source: str

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

    def to_dict(self) -> dict:
        return asdict(self)


def _weight_keys(source: str) -> set[str]:
    """Parameter names stored in a local dir or hub repo, read without loading tensors."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(name: str) -> str | None:
        try:
            return cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    if (index := fetch("model.safetensors.index.json")) is not None:
        return set(json.loads(Path(index).read_text())["weight_map"])
    if (st := fetch("model.safetensors")) is not None:
        with safe_open(st, framework="pt") as f:
            return set(f.keys())
    if (index := fetch("pytorch_model.bin.index.json")) is not None:
        return set(json.loads(Path(index).read_text())["weight_map"])
    if (binary := fetch("pytorch_model.bin")) is not None:
        return set(torch.load(binary, map_location="meta", weights_only=True, mmap=True).keys())
    return set()


def has_layernorm_head(source: str) -> bool:
    """True when the stored weights hold the paper's LayerNorm+Linear CTC head."""
    return set(LAYERNORM_HEAD_KEYS) <= _weight_keys(source)


def load_model(source: str | os.PathLike = DEMO_MODEL_DIR, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, need_tokenizer: bool = False) -> LoadedModel:
    """Load a CTC model, its feature extractor and (if present) its tokenizer.

    ``source`` is a local dir or a hub id. The paper's LayerNorm head is
    detected from the weights and built with :class:`ExtendedWav2Vec2ForCTC`.
    """
    source = str(source)
    if not Path(source).exists() and (source.startswith((".", "/")) or source.count("/") > 1):
        raise ComflpError(f"model not found: {source} (neither a local dir nor a hub id)")
    try:
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ComflpError(f"cannot load model config from {source}: {str(err).splitlines()[0]}") from None
    cls = ExtendedWav2Vec2ForCTC if has_layernorm_head(source) else AutoModelForCTC
    try:
        model = cls.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ComflpError(f"cannot load CTC model from {source}: {str(err).splitlines()[0]}") from None
    try:
        fe = AutoFeatureExtractor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ComflpError(f"{source} has no usable feature extractor (preprocessor_config.json): "
                          f"{str(err).splitlines()[0]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is None and need_tokenizer:
        raise ComflpError(f"{source} has no tokenizer (vocab.json); decoding needs one")
    encoder_layers(model)  # fail early on an unsupported architecture
    model.eval().to(device)
    return LoadedModel(model, fe, tok, source)


def base_model(model: PreTrainedModel) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer layer stack (``base.encoder.layers``), 0-based as a ModuleList."""
    encoder = getattr(base_model(model), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ComflpError(f"unsupported model {type(model).__name__}: its base model has no encoder.layers")
    return layers


def num_layers(model: PreTrainedModel) -> int:
    return len(encoder_layers(model))


def _select_layers(model: PreTrainedModel, kept: Sequence[int]):
    """Make the encoder run only layers ``kept`` (0-based, ascending); return an undo function.

    WavLM computes its relative position bias in the first layer only, so when
    that layer goes its bias embedding moves to the new first layer.
    """
    encoder = base_model(model).encoder
    old_layers = encoder.layers
    old_count = model.config.num_hidden_layers
    encoder.layers = nn.ModuleList([old_layers[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    moved = None
    first_attn = getattr(old_layers[0], "attention", None)
    if kept and kept[0] != 0 and hasattr(first_attn, "rel_attn_embed"):
        moved = encoder.layers[0].attention
        moved.rel_attn_embed = first_attn.rel_attn_embed

    def undo() -> None:
        if moved is not None:
            del moved.rel_attn_embed
        encoder.layers = old_layers
        model.config.num_hidden_layers = old_count

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
def run_layers(model: PreTrainedModel, kept: Sequence[int]) -> Iterator[PreTrainedModel]:
    """Run ``model`` through the 0-based layer indices ``kept`` only, in that order."""
    undo = _select_layers(model, list(kept))
    try:
        yield model
    finally:
        undo()


def prune(model: PreTrainedModel, pruned: Iterable[int]) -> PreTrainedModel:
    """A new model without the 1-based layers ``pruned``; ``model`` is left unchanged."""
    total = num_layers(model)
    pruned = validate_strategy(pruned, total)
    kept = [i for i in range(total) if i + 1 not in set(pruned)]
    new = copy.deepcopy(model)
    _select_layers(new, kept)
    return new


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_info(loaded: LoadedModel) -> ModelInfo:
    model = loaded.model
    cfg = model.config
    head = "layernorm+linear" if isinstance(model, ExtendedWav2Vec2ForCTC) else "linear"
    return ModelInfo(
        family=cfg.model_type,
        num_layers=num_layers(model),
        num_parameters=count_parameters(model),
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        head=head,
        sampling_rate=getattr(loaded.feature_extractor, "sampling_rate", None),
    )


def save_model(model: PreTrainedModel, out_dir: str | os.PathLike, *, feature_extractor=None, tokenizer=None,
               dtype: torch.dtype | None = None) -> Path:
    """Save in HF format (config + model.safetensors + processor files), atomically.

    The model is written to a temp dir beside ``out_dir`` and renamed into
    place; an existing ``out_dir`` is replaced only once the new one is whole.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        to_save = model if dtype is None else copy.deepcopy(model).to(dtype)
        to_save.save_pretrained(tmp)
        if feature_extractor is not None:
            feature_extractor.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
