"""Batch invariance: a padded batch gives each utterance what it gives alone, and the forward that ensures it.

Every place where an encoder reads padding is switched off by :func:`padding_exact` (the family table says
where each family has one); :class:`ExactForExport` is the same written in tensors alone, for a traced graph.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from torch import nn

from .families import Family, base_model, encoder_config, family_of, get_module, set_module
from .frames import conv_lengths, feature_lengths, layer_lengths
from .layers import stack_layers


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


def _subsampled_mask(frames: torch.Tensor, stride: int, device):
    """A forward pre-hook (with kwargs) replacing a module's ``attention_mask`` [B, T] by one whose every
    ``stride``-th step (0, stride, 2 stride, ...) is 1 exactly for each utterance's ``frames`` real frames."""
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:
            return None
        steps = torch.arange(mask.shape[-1], device=device)[None, :]
        kwargs["attention_mask"] = (steps < stride * (frames.to(device)[:, None] - 1) + 1).to(mask.dtype)
        return args, kwargs
    return hook


def _pooled_mask_hooks(model: nn.Module, base: nn.Module, family: Family, sample_lengths: torch.Tensor,
                       device) -> list:
    """Hooks giving a pooling family's layers the ``floor(frames / squeeze)`` pooled frames each utterance has
    alone, and zeroing the upsampled output past ``floor(frames / squeeze) * squeeze`` (see ``Family``)."""
    from transformers.masking_utils import create_bidirectional_mask

    pooled = layer_lengths(model, sample_lengths).to(device)
    mask = (torch.arange(int(pooled.max()) + 1, device=device)[None, :] < pooled[:, None]).long()  # [B, T] pooled
    hooks = []
    if family.pooling.mask == "layers":
        def layer_mask(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs["attention_mask"] = create_bidirectional_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=mask[:, : hidden.shape[1]])
            return args, kwargs

        hooks += [layer.register_forward_pre_hook(layer_mask, with_kwargs=True) for layer in stack_layers(model)]
    else:
        def encoder_mask(module, args, kwargs):  # (hidden_states, attention_mask, ...)
            hidden = args[0] if args else kwargs["hidden_states"]
            if len(args) > 1:
                args = (args[0], mask[:, : hidden.shape[1]], *args[2:])
            else:
                kwargs["attention_mask"] = mask[:, : hidden.shape[1]]
            return args, kwargs

        hooks.append(get_module(base, family.pooling.mask).register_forward_pre_hook(encoder_mask, with_kwargs=True))
    frames = pooled * int(getattr(encoder_config(model), family.pooling.squeeze_field))

    def zero_tail(module, args, output):  # [B, T, D]: the frames an utterance alone does not have
        keep = torch.arange(output.shape[1], device=output.device)[None, :] < frames[:, None]
        return output * keep[..., None].to(output.dtype)

    hooks.append(get_module(base, family.pooling.upsample).register_forward_hook(zero_tail))
    return hooks


@contextlib.contextmanager
def padding_exact(model: nn.Module, sample_lengths: Sequence[int]) -> Iterator[nn.Module]:
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
      and the upsampled frames past them are zeroed (the table's ``pooling``);
    - a front end of plain convs with a group norm over time between them (Moonshine, the table's
      ``conv_front_end`` and ``time_norm``) gets the masked group norm too;
    - a module that subsamples the input mask into its frame mask (the table's ``subsampled_mask``:
      Moonshine's encoder keeps every 384th sample, so one or two frames computed from padding count as
      real) is handed a mask whose kept steps mark exactly each utterance's real frames.

    Feature-input families (``front_end_exact``) need neither: their features are computed per utterance
    and their front ends mask padded frames. ``sample_lengths`` are the input's real time steps (samples,
    or feature frames). Attention itself is masked exactly by the frame attention mask.
    """
    inner = getattr(model, "module", model)  # under DDP the HF model is the wrapper's .module
    base = base_model(inner)
    family = family_of(inner)
    device = next(inner.parameters()).device
    restore: list[tuple[object, str, object]] = []  # (owner, attribute, original)
    encoder = get_module(base, family.feature_encoder)
    stack = _conv_stack(encoder)
    lengths = torch.as_tensor(list(sample_lengths))
    if family.conv_front_end:  # unpadded convs: only a group norm over time between them reads padding
        if family.time_norm is not None:
            path, convs_before = family.time_norm
            norm = get_module(base, path)
            parent_path, _, name = path.rpartition(".")
            restore.append((get_module(base, parent_path) if parent_path else base, name, norm))
            convs = [get_module(base, conv) for conv in family.conv_front_end[:convs_before]]
            set_module(base, path, _MaskedGroupNorm(norm, conv_lengths(convs, lengths).to(device)))
    elif stack is not None and not family.front_end_exact:
        for layer, conv in stack:
            lengths = torch.div(lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.GroupNorm):
                restore.append((layer, "layer_norm", norm))
                layer.layer_norm = _MaskedGroupNorm(norm, lengths.clamp(min=0).to(device))
    elif not family.front_end_exact:
        parent_path, _, name = family.feature_encoder.rpartition(".")
        restore.append((get_module(base, parent_path) if parent_path else base, name, encoder))
        set_module(base, family.feature_encoder, _UnpaddedFeatureEncoder(encoder, sample_lengths))
    hooks = []  # forward hooks removed on exit
    if family.subsampled_mask is not None:
        path, stride = family.subsampled_mask
        hooks.append(get_module(base, path).register_forward_pre_hook(
            _subsampled_mask(feature_lengths(inner, torch.as_tensor(list(sample_lengths))), stride, device),
            with_kwargs=True))
    conv_stack = get_module(base, family.position_conv_layers) if family.position_conv_layers else None
    if conv_stack is not None:
        frames = feature_lengths(inner, torch.as_tensor(list(sample_lengths)))
        mask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).to(device)
        hooks += [layer.register_forward_hook(_zero_padded_output(mask)) for layer in conv_stack]
    if family.pooling is not None:
        hooks += _pooled_mask_hooks(inner, base, family, torch.as_tensor(list(sample_lengths)), device)
    if family.depthwise_conv:
        frames = layer_lengths(inner, torch.as_tensor(list(sample_lengths)))
        mask = (torch.arange(int(frames.max()))[None, :] < frames[:, None]).to(device)
        hooks += [get_module(layer, family.depthwise_conv).register_forward_pre_hook(_zero_padded_input(mask))
                  for layer in stack_layers(inner)]
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

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        family = family_of(model)
        encoder = get_module(base_model(model), family.feature_encoder)
        stack = _conv_stack(encoder) or []
        self.exact = family.front_end_exact or (
            bool(stack) and not (family.position_conv_layers or family.depthwise_conv or family.pooling is not None))
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


def call(model: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
    """``model``'s own forward, with ``inputs`` passed as the family's input kind (``input_values``/``input_features``).

    An encoder-decoder model without decoder inputs (``labels`` or ``decoder_input_ids``) runs its encoder only.
    """
    inner = getattr(model, "module", model)  # under DDP the HF model is the wrapper's .module
    kind = family_of(inner).input_kind
    if "decoder" in family_of(inner).stacks and "labels" not in kwargs and "decoder_input_ids" not in kwargs:
        return inner.get_encoder()(**{kind: inputs}, attention_mask=attention_mask, **kwargs)
    return model(**{kind: inputs}, attention_mask=attention_mask, **kwargs)


def forward(model: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor, *,
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


