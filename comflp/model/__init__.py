"""Models: the family table, loading, layer stacks, framing and batch invariance.

- :mod:`.families`: the family table (:class:`Family`, its :class:`Stack` and :class:`Pooling` records);
- :mod:`.load`: the one loader (:func:`load_model`), weight checks, fingerprints, ``comflp info``;
- :mod:`.layers`: layer selection (switching layers off), pruning, saving;
- :mod:`.frames`: audio -> input steps -> encoder frames, frame masks, default feature extractors;
- :mod:`.exact`: batch invariance (:func:`padding_exact`), the forward (:func:`call`, :func:`forward`) and
  :class:`ExactForExport`.

The names below are the package's API; the rest of comflp imports them from here.
"""

from .exact import ExactForExport, call, forward, padding_exact
from .families import (FAMILIES, STACKS, Family, Pooling, Stack, base_model, encoder_config, family_of, stack_config,
                       stack_of)
from .frames import (default_feature_extractor, encoder_frames, feature_lengths, frame_mask, input_lengths,
                     layer_frame_mask, min_audio_samples)
from .layers import (adapter_files, count_parameters, freeze_feature_encoder, front_end, num_layers, prune,
                     prune_layer_weights, run_layers, save_model, set_layerdrop, skip_layers, stack_layers)
from .load import (ExtendedWav2Vec2ForCTC, LoadedModel, ModelInfo, fingerprint, has_layernorm_head, load_model,
                   model_info)

__all__ = [
    "FAMILIES", "STACKS", "ExactForExport", "ExtendedWav2Vec2ForCTC", "Family", "LoadedModel", "ModelInfo", "Pooling",
    "Stack", "adapter_files", "base_model", "call", "count_parameters", "default_feature_extractor",
    "encoder_config", "encoder_frames", "family_of", "feature_lengths", "fingerprint", "forward", "frame_mask",
    "freeze_feature_encoder", "front_end", "has_layernorm_head", "input_lengths", "layer_frame_mask", "load_model",
    "min_audio_samples", "model_info", "num_layers", "padding_exact", "prune", "prune_layer_weights", "run_layers",
    "save_model", "set_layerdrop", "skip_layers", "stack_config", "stack_layers", "stack_of",
]
