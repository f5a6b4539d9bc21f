"""LoRA adapters for healing a model too big to fine-tune whole (``comflp finetune --lora_rank N``), via peft.

Low-rank adapters (``W + (alpha / r) B A``, peft's ``LoraConfig``) are put on every linear layer inside the
model's layer stacks (the family table's; not the front end, the projector or the head), and only they train.
The model stays the HF model it was (peft's layers replace its linears in place), so everything comflp asks of
a model (its family, its stacks, decoding) works during training. What comflp saves is merged (``B A`` added
into ``W``, the adapters gone): a plain checkpoint that loads anywhere, equal to the adapted model.
"""

from __future__ import annotations

import copy
import re

from torch import nn

from .model import family_of, stack_layers


def lora_targets(model) -> list[str]:
    """The names of the linear layers inside ``model``'s layer stacks (every stack of its family)."""
    inside = [m for stack in family_of(model).stacks for m in stack_layers(model, stack).modules()]
    ids = {id(m) for m in inside if isinstance(m, nn.Linear)}
    return [name for name, module in model.named_modules() if id(module) in ids]


def with_lora(model, *, rank: int, alpha: float | None = None, seed: int = 0):
    """``model`` with LoRA adapters of rank ``rank`` (scale ``alpha / rank``; ``alpha`` defaults to ``2 *
    rank``) on :func:`lora_targets`, its other parameters frozen; the same object, changed in place. B starts at
    zero (peft's default), so the adapted model starts equal to ``model``; ``seed`` draws A."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_targets(model)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$", bias="none")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name
    return model


def has_lora(model) -> bool:
    """Whether ``model`` carries LoRA adapters (:func:`with_lora`): peft names their weights ``lora_A``/``lora_B``
    (asked by name, so that a run without adapters never imports peft)."""
    return any(".lora_A." in name for name, _ in model.named_parameters())


def merged(model):
    """A copy of ``model`` with its LoRA adapters merged into the weights they adapt and removed: the plain
    model (its own class, its own parameter names) that computes what the adapted one does. ``model`` is left
    as it is (still adapted, still training)."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(model)
    layers = [(name, m) for name, m in out.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, layer.get_base_layer())
    for parameter in out.parameters():
        parameter.requires_grad = True
    return out
