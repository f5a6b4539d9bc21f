"""What the LLM-layer candidates of a speech-LLM's fine search share of their prompt's prefill.

Generation starts with a prefill: the whole prompt (hundreds of audio tokens) through every kept layer of the
LLM, each writing its keys and values into the cache. Layer j of a candidate sees the prompt's states after
its kept layers 0..j-1, so two candidates whose kept-layer sequences share the prefix ``s[:j + 1]`` compute
the same output and the same keys and values at layer j: the fine search walks the kept sequences depth
first (:meth:`comflp.verify.FineSearch._decode`, as for an encoder's cached prefixes), and each candidate
replays the prefill of the longest prefix already computed, computing only the rest.

transformers has no API for a prefill that starts mid-stack, so this module does it around ``generate``:
during the first forward of the LLM, the layers of the shared prefix are stood in for by :class:`_Replay`
modules that write the recorded keys and values into the cache (through the cache's own ``update``, as the
layer's attention would) and return the recorded output; the other layers run, and their outputs and their
cache writes are recorded for the candidates that follow. After the prefill, every layer runs as usual.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .model import base_model, family_of, stack_layers
from .model.families import get_module

# recorded prefill states kept along one path of the depth-first walk (one batch): beyond this the rest of a
# candidate's prefill is computed without being recorded, which costs time, not exactness
PREFILL_BUDGET_GB = 2.0


def _cache_of(kwargs: dict):
    """The key/value cache a forward was given (transformers 5 names it ``cache``; ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _size(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_size(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_size(o) for o in obj.values())
    return 0


class _Replay(nn.Module):
    """Stands in for a decoder layer during the prefill: writes the recorded cache update and returns the
    recorded output; after the prefill (``state["prefill"]`` false) it is the layer itself."""

    def __init__(self, layer: nn.Module, recorded: tuple, state: dict):
        super().__init__()
        self.layer = layer
        self.recorded = recorded  # (the cache update's args, its kwargs, the layer's output)
        self.state = state

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the LLM's forward reads of its layers (e.g. attention_type)
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        if not self.state["prefill"]:
            return self.layer(*args, **kwargs)
        update_args, update_kwargs, output = self.recorded
        cache = _cache_of(kwargs)
        if cache is not None:
            cache.update(*update_args, **update_kwargs)
        return output


class PromptPrefills:
    """The recorded prefill states of one batch's prompt, keyed by kept-layer prefix (source indices).

    ``source``: the LLM's layers of the full model, in order; a candidate's kept sequence is read from the
    layers its switched-off model holds (:meth:`replayed`).
    """

    def __init__(self, model, budget_gb: float = PREFILL_BUDGET_GB):
        self.source = list(stack_layers(model, "decoder"))
        self.store: dict[tuple[int, ...], tuple] = {}
        self.bytes = 0
        self.budget = budget_gb * 2**30
        self.replayed_layers = 0  # prefill layer applications replayed, not computed (for tests and benches)
        self.computed_layers = 0

    @contextlib.contextmanager
    def replayed(self, model) -> Iterator[None]:
        """Within the block, ``model`` (its LLM layers switched to a candidate's) generates with the prefill of
        its longest recorded kept prefix replayed, and records the rest."""
        layers = stack_layers(model, "decoder")
        index = {id(layer): i for i, layer in enumerate(self.source)}
        kept = tuple(index[id(layer)] for layer in layers)
        for key in [k for k in self.store if kept[: len(k)] != k]:  # off this candidate's path: not needed again
            self.bytes -= _size(self.store.pop(key))
        shared = 0
        while shared < len(kept) and kept[: shared + 1] in self.store:
            shared += 1
        state = {"prefill": True}
        originals = list(layers)
        updates: dict[int, tuple] = {}
        outputs: dict[int, object] = {}
        llm = get_module(base_model(model), family_of(model).decoder.layers.rpartition(".")[0])

        def start(module, args, kwargs):
            cache = _cache_of(kwargs)
            if not state["prefill"] or cache is None:
                return
            update = cache.update

            def recording(*u_args, **u_kwargs):
                position = u_args[2] if len(u_args) > 2 else u_kwargs.get("layer_idx")
                if position is not None and position >= shared:
                    updates[int(position)] = (u_args, u_kwargs)
                return update(*u_args, **u_kwargs)

            cache.update = recording  # an instance attribute over the class's method, removed after the prefill
            state["cache"] = cache

        def end(module, args, kwargs, output):
            if state["prefill"]:
                state["prefill"] = False
                cache = state.pop("cache", None)
                if cache is not None:
                    del cache.update

        def recorder(position: int):
            def hook(module, args, kwargs, output):
                if state["prefill"]:
                    outputs[position] = output
            return hook

        handles = [llm.register_forward_pre_hook(start, with_kwargs=True),
                   llm.register_forward_hook(end, with_kwargs=True)]
        handles += [layers[j].register_forward_hook(recorder(j), with_kwargs=True) for j in range(shared, len(kept))]
        for j in range(shared):
            layers[j] = _Replay(originals[j], self.store[kept[: j + 1]], state)
        try:
            yield
        finally:
            for j in range(shared):
                layers[j] = originals[j]
            for handle in handles:
                handle.remove()
            cache = state.pop("cache", None)
            if cache is not None and "update" in vars(cache):
                del cache.update
        self.replayed_layers += shared
        self.computed_layers += len(kept) - shared
        for j in range(shared, len(kept)):
            if j not in updates or j not in outputs:
                break  # a layer that wrote no cache (or did not run): nothing exact to replay from here on
            recorded = (*updates[j], outputs[j])
            size = _size(recorded)
            if self.bytes + size > self.budget:
                break
            self.store[kept[: j + 1]] = recorded
            self.bytes += size
