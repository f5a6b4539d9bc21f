"""Layer stacks: selection (switching layers off without copying weights), pruning and saving.

Layers are 1-based in the public API. Pruning and switching layers off select existing modules; nothing is
renamed by state-dict index arithmetic, and the config's depth field follows, so ``save_pretrained`` output
reloads anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..artifacts import write_dir
from ..errors import ComflpError
from ..strategy import validate as validate_strategy
from .families import base_model, encoder_config, family_of, get_module, stack_config, stack_of

log = logging.getLogger(__name__)


def layers_slot(model, stack: str = "encoder") -> tuple[nn.Module, str]:
    """The module holding the layer stack ``stack`` and the attribute name, from the family table's layer path."""
    path = stack_of(model, stack).layers
    parent_path, _, name = path.rpartition(".")
    parent = get_module(base_model(model), parent_path) if parent_path else base_model(model)
    if parent is None or not isinstance(getattr(parent, name, None), nn.ModuleList):
        raise ComflpError(f"unsupported model {type(model).__name__}: its base model has no {path}")
    return parent, name


def stack_layers(model, stack: str = "encoder") -> nn.ModuleList:
    """The layer stack ``stack`` ("encoder", or "decoder" for encoder-decoder families), 0-based."""
    parent, name = layers_slot(model, stack)
    return getattr(parent, name)


def num_layers(model, stack: str = "encoder") -> int:
    """The depth of ``stack``."""
    return len(stack_layers(model, stack))


def select_layers(model, kept: Sequence[int], stack: str = "encoder"):
    """Make ``stack`` run only layers ``kept`` (0-based, ascending); return an undo function.

    WavLM computes its relative position bias in the first layer only, so when
    that layer goes its bias embedding moves to the new first layer. Modules
    that carry their layer's cache index (the table's ``cache_index``, ``layer_idx``: Whisper's decoder
    attention) get their new position, so cached generation reads and writes
    the right cache slots.
    """
    parent, name = layers_slot(model, stack)
    old_layers = getattr(parent, name)
    fields = stack_of(model, stack)
    config = stack_config(model, stack)
    old_count = getattr(config, fields.depth_field)
    rewritten = index_fields(model, stack, kept)
    previous = {key: getattr(config, key) for key in rewritten}
    copies = [(get_module(base_model(model), path), attribute) for path, attribute in fields.depth_copies]
    copied = [getattr(module, attribute) for module, attribute in copies]
    setattr(parent, name, nn.ModuleList([old_layers[i] for i in kept]))
    setattr(config, fields.depth_field, len(kept))
    for key, value in rewritten.items():
        setattr(config, key, value)
    for module, attribute in copies:
        setattr(module, attribute, len(kept))
    renumbered = []
    for new, i in enumerate(kept):
        for module in old_layers[i].modules():
            if isinstance(getattr(module, fields.cache_index, None), int) and getattr(module, fields.cache_index) != new:
                renumbered.append((module, getattr(module, fields.cache_index)))
                setattr(module, fields.cache_index, new)
    moved = None
    first_attn = getattr(old_layers[0], "attention", None)
    if kept and kept[0] != 0 and hasattr(first_attn, "rel_attn_embed"):
        moved = getattr(parent, name)[0].attention
        moved.rel_attn_embed = first_attn.rel_attn_embed

    def undo() -> None:
        for module, index in renumbered:
            setattr(module, fields.cache_index, index)
        for key, value in previous.items():
            setattr(config, key, value)
        for (module, attribute), value in zip(copies, copied):
            setattr(module, attribute, value)
        if moved is not None:
            del moved.rel_attn_embed
        setattr(parent, name, old_layers)
        setattr(config, fields.depth_field, old_count)

    return undo


def index_fields(model, stack: str, kept: Sequence[int]) -> dict:
    """The index-bearing config fields of ``stack`` (the family table's ``layer_lists``, ``prefix_counts``,
    ``state_indices``) as they must read when only the 0-based layers ``kept`` stay; one line refusing a
    layer set the model cannot express (``half_feedback``, ``state_indices`` that collapse).

    Switching a layer off passes its input on, so hidden state i of the source becomes state
    ``#kept layers <= i`` of the pruned stack: that is where a state index, or the layer after which Granite
    feeds its CTC output back, must point.
    """
    fields = stack_of(model, stack)
    config = stack_config(model, stack)
    depth = getattr(config, fields.depth_field)
    kept = list(kept)

    def state(i: int) -> int:  # source hidden state i -> the pruned stack's state that equals it
        return sum(1 for k in kept if k < i)

    out: dict = {}
    for key in fields.layer_lists:
        values = getattr(config, key, None)
        if values is not None:
            if len(values) != depth:
                raise ComflpError(f"the config's {key} has {len(values)} entries for {depth} {stack} layers "
                                  f"({fields.depth_field}): the config disagrees with itself")
            out[key] = [values[i] for i in kept]
    for key in fields.prefix_counts:
        count = getattr(config, key, None)
        if isinstance(count, int):
            out[key] = state(count)
    for key in fields.state_indices:
        indices = getattr(config, key, None)
        if indices:
            new = [state(int(i)) for i in indices]
            if len(set(new)) != len(new):
                raise ComflpError(f"the {stack} concatenates its hidden states {list(indices)} ({key}); without "
                                  f"layers {_one_based_removed(kept, depth)} two of them become one, which would "
                                  "change the projector's input width: keep a layer between each two")
            out[key] = new
    if fields.half_feedback and len(kept) != depth:
        source, target = depth // 2, len(kept) // 2
        if state(source) != target:
            raise ComflpError(
                f"the {stack} feeds its CTC output back after layer {source} of {depth} (depth // 2); without layers "
                f"{_one_based_removed(kept, depth)} that point lies after kept layer {state(source)} but the pruned "
                f"{len(kept)}-layer {stack} feeds back after its layer {target}: remove "
                f"{source - target} layer(s) among 1..{source} and the rest above it")
    return out


class Expressible:
    """The sets of 1-based layers of one stack the pruned model can express (those :func:`index_fields` does
    not refuse), as a predicate; ``reachable`` tells a search building a set layer by layer whether a partial
    set can still grow into one."""

    def __init__(self, model, stack: str):
        self.model, self.stack = model, stack
        self.fields = stack_of(model, stack)
        self.config = stack_config(model, stack)
        self.depth = int(getattr(self.config, self.fields.depth_field))

    def __call__(self, pruned: Sequence[int]) -> bool:
        gone = set(pruned)
        try:
            index_fields(self.model, self.stack, [i for i in range(self.depth) if i + 1 not in gone])
        except ComflpError:
            return False
        return True

    def reachable(self, pruned: Sequence[int], k: int) -> bool:
        """Whether some set of ``k`` layers holding ``pruned`` may be expressible (a necessary condition):
        Granite's feedback point needs exactly depth // 2 - (depth - k) // 2 pruned layers at or below it,
        and concatenated states i < j need a kept layer among i + 1..j, which adding layers cannot give back."""
        gone = set(pruned)
        if self.fields.half_feedback:
            half = self.depth // 2
            below = half - (self.depth - k) // 2
            under = sum(1 for p in gone if p <= half)
            if under > below or len(gone) - under > k - below:
                return False
        for key in self.fields.state_indices:
            indices = sorted(int(i) for i in (getattr(self.config, key, None) or []))
            if any(all(layer in gone for layer in range(i + 1, j + 1)) for i, j in zip(indices, indices[1:])):
                return False
        return True


def expressible(model, stack: str = "encoder") -> Expressible | None:
    """:class:`Expressible` of ``stack``, or None where the family table refuses no set. ``model`` may be
    anything with the model's ``config``, so a coarse search can ask before loading weights."""
    return Expressible(model, stack) if stack_of(model, stack).refuses_sets else None


def _one_based_removed(kept: Sequence[int], depth: int) -> str:
    return ",".join(str(i + 1) for i in range(depth) if i not in set(kept))


@contextlib.contextmanager
def skip_layers(model, pruned: Iterable[int], stack: str = "encoder") -> Iterator:
    """Run ``model`` with 1-based layers ``pruned`` of ``stack`` switched off (no weight copies)."""
    total = num_layers(model, stack)
    pruned = list(pruned)
    if pruned:
        pruned = validate_strategy(pruned, total)
    kept = [i for i in range(total) if i + 1 not in set(pruned)]
    undo = select_layers(model, kept, stack)
    try:
        yield model
    finally:
        undo()


@contextlib.contextmanager
def run_layers(model, kept: Sequence[int], stack: str = "encoder") -> Iterator:
    """Run ``model`` through the 0-based layer indices ``kept`` of ``stack`` only, in that order."""
    undo = select_layers(model, list(kept), stack)
    try:
        yield model
    finally:
        undo()


def front_end(model) -> nn.Module:
    """The family's front end: the conv feature encoder, feature projection or subsampling before the layers."""
    return get_module(base_model(model), family_of(model).feature_encoder)


def freeze_feature_encoder(model) -> None:
    """Stop training the family's front end (the modules before the first layer; a front end of several
    convs, the table's ``conv_front_end``, with its group norm)."""
    encoder = front_end(model)
    if hasattr(encoder, "_freeze_parameters"):  # wav2vec2's conv encoder also stops asking for input gradients
        encoder._freeze_parameters()
        return
    family = family_of(model)
    rest = [*family.conv_front_end, *([family.time_norm[0]] if family.time_norm else [])]
    for module in (encoder, *(get_module(base_model(model), path) for path in rest)):
        for p in module.parameters():
            p.requires_grad = False


def set_layerdrop(model, probability: float) -> bool:
    """Train ``model`` with LayerDrop ``probability`` (its config records it too); False when the family has
    none (the family table's ``layerdrop``)."""
    family = family_of(model)
    if not family.layerdrop:
        return False
    for name in family.layerdrop:
        setattr(encoder_config(model), name, probability)
    for path in family.layerdrop_modules:
        get_module(base_model(model), path).layerdrop = probability
    return True


def prune(model: nn.Module, pruned: Iterable[int], *, decoder_pruned: Iterable[int] = ()) -> nn.Module:
    """A new model without the 1-based layers ``pruned`` (and ``decoder_pruned`` of an encoder-decoder model's
    decoder; either may then be empty); ``model`` is left unchanged.

    Whisper's ``generation_config.alignment_heads`` (decoder layer, head) pairs follow the decoder layers
    they name: renumbered, and dropped with a removed layer; when none is left the field goes, with a
    warning that word timestamps will be unavailable.
    """
    plan = {"encoder": list(pruned), "decoder": list(decoder_pruned)}
    if plan["decoder"] and "decoder" not in family_of(model).stacks:
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
        select_layers(new, kept, stack)
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


def prune_layer_weights(weights: dict[str, torch.Tensor], model, kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """Weights named like ``model``'s parameters (an MMS ``adapter.<lang>.safetensors``), for the kept layers only.

    kept: the source layers kept, 0-based ascending. A key under the layer stack (``wav2vec2.encoder.layers.<i>.``)
    is dropped when layer i goes and renumbered to its new position otherwise; other keys (the adapter's
    ``lm_head``) are kept as they are.
    """
    layers = stack_layers(model)
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


def save_model(model, out_dir: str | os.PathLike, *, feature_extractor=None, tokenizer=None,
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


def count_parameters(model: nn.Module) -> int:
    """The number of parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())
