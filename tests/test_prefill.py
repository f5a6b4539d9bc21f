"""The prompt's prefill shared by an LLM fine search's candidates: replaying the recorded layers of a shared
kept prefix generates exactly what computing them does, for each LLM class the speech-LLMs use."""

from __future__ import annotations

import pytest
import torch

from comflp.heads import llm_input_embeddings
from comflp.model import skip_layers
from comflp.prefill import PromptPrefills

from tiny_speechllm import audio_prompt, tiny_speech_llm

# Qwen2 (sliding-window layers), Llama, Qwen3, Granite (residual multipliers)
LLM_CLASSES = ["qwen2_audio", "voxtral", "qwen3_asr", "granite_speech"]
# depth-first order of their kept sequences, as the fine search walks them
PRUNED = [[4], [3], [2], [1]]  # kept (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)


def _generate(model, inputs: dict):
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", LLM_CLASSES)
def test_replayed_prefill_generates_exactly_what_computing_it_does(family: str) -> None:
    model = tiny_speech_llm(family, seed=2)
    ids, audio = audio_prompt(model, seed=4)
    with torch.no_grad():
        embeds = llm_input_embeddings(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **audio})
        inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(ids)}
        prefills = PromptPrefills(model)
        for pruned in PRUNED:
            with skip_layers(model, pruned, "decoder"):
                expected = _generate(model, inputs)
                with prefills.replayed(model):
                    got = _generate(model, inputs)
            assert torch.equal(got[0], expected[0])
            assert torch.equal(got[1], expected[1])  # the scores, bit for bit
    # (0, 1, 3) replays 0 and 1, (0, 2, 3) replays 0, (1, 2, 3) none
    assert (prefills.replayed_layers, prefills.computed_layers) == (3, 9)
    # the model is as it was: every layer its own, no cache method left patched
    assert all(type(layer).__name__ != "_Replay" for layer in model.model.language_model.layers)


def test_recording_stops_at_the_budget_and_stays_exact() -> None:
    """With no room to record, every candidate computes its whole prefill, and generates the same."""
    model = tiny_speech_llm("qwen2_audio", seed=2)
    ids, audio = audio_prompt(model, seed=4)
    with torch.no_grad():
        embeds = llm_input_embeddings(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), **audio})
        inputs = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(ids)}
        prefills = PromptPrefills(model, budget_gb=0.0)
        for pruned in PRUNED[:2]:
            with skip_layers(model, pruned, "decoder"):
                expected = _generate(model, inputs)
                with prefills.replayed(model):
                    got = _generate(model, inputs)
            assert torch.equal(got[1], expected[1])
    assert (prefills.replayed_layers, prefills.bytes, prefills.store) == (0, 0, {})
