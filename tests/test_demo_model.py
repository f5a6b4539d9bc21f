"""The shipped demo model: loads with plain transformers and recognises the embedded corpus."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCTC, AutoProcessor

from comflp.demo.corpus import read_corpus
from comflp.decode import transcribe
from comflp.paths import DEMO_MODEL_DIR, demo_split


def test_loads_with_plain_transformers_and_decodes_dev() -> None:
    model, info = AutoModelForCTC.from_pretrained(DEMO_MODEL_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(DEMO_MODEL_DIR)
    utts = read_corpus(demo_split("dev"))[:20]  # generates the corpus on a fresh clone
    result = transcribe(model.float().eval(), processor.feature_extractor, processor.tokenizer, utts, batch_size=10)
    assert result.score("char").rate < 0.30


def test_info_reports_twelve_layers() -> None:
    from conftest import run_comflp

    out = run_comflp("info", str(DEMO_MODEL_DIR), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["num_layers"] == 12 and info["family"] == "wav2vec2" and info["vocab_size"] == 303


def test_the_demo_speech_llm_loads_with_plain_transformers_and_decodes_dev() -> None:
    """models/demo-speechllm: a plain Qwen2-Audio checkpoint with its processor; plain transformers' greedy
    generation from the processor's chat prompt recognises the dev split as comflp does, under 30% CER."""
    from transformers import AutoModelForMultimodalLM

    from comflp.data import load_audio
    from comflp.heads import chat_prompt
    from comflp.metrics import error_rate
    from comflp.model import load_model
    from comflp.paths import DEMO_SPEECHLLM_DIR

    model, info = AutoModelForMultimodalLM.from_pretrained(DEMO_SPEECHLLM_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = model.float().eval()
    processor = AutoProcessor.from_pretrained(DEMO_SPEECHLLM_DIR)
    utts = read_corpus(demo_split("dev"))[:20]
    text = chat_prompt(model, processor)
    hyps = []
    for u in utts:
        inputs = processor(text=text, audio=[load_audio(u.path, 16000)], sampling_rate=16000, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=40, do_sample=False, num_beams=1)
        hyps.append(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    plain = error_rate([u.text for u in utts], hyps, unit="char").rate
    loaded = load_model(DEMO_SPEECHLLM_DIR, allow_encoder_decoder=True, need_tokenizer=True)
    ours = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=8).score("char").rate
    assert plain < 0.30 and ours == pytest.approx(plain, abs=0.02)
