"""The shipped demo model: loads with plain transformers and recognises the embedded corpus."""

from __future__ import annotations

import json

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
