"""Measure the shipped demo model and write its model card (``models/demo-12l/README.md``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import atomic
from .artifacts import ExperimentDir
from .errors import ComflpError
from .options import read_corpus
from .model import count_parameters, load_model, num_layers
from .paths import demo_split
from .verify import FineSearch

log = logging.getLogger(__name__)

SIX_OF_TWELVE = {
    "odd layers (1,3,5,7,9,11)": [1, 3, 5, 7, 9, 11],
    "even layers (2,4,...,12)": [2, 4, 6, 8, 10, 12],
    "first six (1-6)": [1, 2, 3, 4, 5, 6],
    "middle six (4-9)": [4, 5, 6, 7, 8, 9],
    "last six (7-12)": [7, 8, 9, 10, 11, 12],
}


def pruning_table(model_dir: Path, *, batch_size: int = 32) -> dict:
    """Test-split CER of the full model, every single-layer removal and a few 6-of-12 removals."""
    loaded = load_model(model_dir, need_tokenizer=True)
    L = num_layers(loaded.model)
    results: dict = {"num_layers": L, "num_parameters": count_parameters(loaded.model)}
    for split in ("dev", "test"):
        fine = FineSearch(loaded, read_corpus(demo_split(split)), batch_size=batch_size)
        sets = [[]] if split == "dev" else [[]] + [[i] for i in range(1, L + 1)] + list(SIX_OF_TWELVE.values())
        rates = [r.rate for r in fine.evaluate(sets)]
        results[f"{split}_cer"] = rates[0]
        if split == "test":
            results["single"] = {str(i): rates[i] for i in range(1, L + 1)}
            results["six"] = dict(zip(SIX_OF_TWELVE, rates[L + 1:]))
    return results


def write_card(model_dir: Path, exp_dir: Path, *, batch_size: int = 32) -> Path:
    from .plots import curves

    res = pruning_table(Path(model_dir), batch_size=batch_size)
    metrics_file = Path(exp_dir) / "metrics.jsonl"
    if metrics_file.exists():
        metrics = ExperimentDir(exp_dir).read_metrics(key="step")
        curve = Path(model_dir) / "training_curve.png"
        curves({"dev CER (%)": ([m["step"] for m in metrics], [100 * m["dev_cer"] for m in metrics])}, curve,
               xlabel="optimizer step", ylabel="dev CER (%)", title="demo-12l training")
    else:  # a fresh clone has no training run: keep the curve recorded when the model was trained
        previous = Path(model_dir) / "results.json"
        metrics = json.loads(previous.read_text())["training"] if previous.exists() else []
        if not metrics:
            raise ComflpError(f"no training metrics: neither {metrics_file} nor a 'training' entry in {previous}")
        log.info("training curve from %s (no %s)", previous, metrics_file)
    res["training"] = [{k: m[k] for k in ("step", "train_loss", "dev_cer")} for m in metrics]
    atomic.write_json(Path(model_dir) / "results.json", res)
    corpus = json.loads((demo_split("train").parent / "corpus.json").read_text(encoding="utf-8"))
    single = "\n".join(f"| {i} | {100 * r:.2f} |" for i, r in res["single"].items())
    six = "\n".join(f"| {name} | {100 * r:.2f} |" for name, r in res["six"].items())
    curve_rows = "\n".join(f"| {m['step']} | {m['train_loss']:.3f} | {100 * m['dev_cer']:.2f} |" for m in metrics)
    cfg = corpus["config"]
    text = f"""---
language: zh
tags: [automatic-speech-recognition, ctc, wav2vec2, comflp, synthetic]
---

# demo-12l: a 12-layer wav2vec2-style CTC model for the comflp demo

A small CTC model trained **from scratch** on comflp's embedded synthetic Mandarin corpus
(`AISHELL1/demo/`, espeak-ng speech). It exists so that every comflp command runs offline;
it is not a real-world ASR model.

| | |
|---|---|
| architecture | `Wav2Vec2ForCTC`, stable layer norm, 12 layers x 144 wide, 4 heads, FFN 576, group-norm conv front-end (7 convs, 64-128 channels) |
| parameters | {res['num_parameters']:,} |
| vocabulary | {cfg['vocab_size'] + 3} tokens: `<pad>` (CTC blank), `<unk>`, `|`, {cfg['vocab_size']} characters with distinct espeak-ng pronunciations |
| weights | `model.safetensors`, float16 |
| **dev CER** (200 utt.) | **{100 * res['dev_cer']:.2f}%** |
| **test CER** (200 utt.) | **{100 * res['test_cer']:.2f}%** |

Greedy CTC decoding, CER over the whole split (character units), measured by
`python -m comflp.demo card` with comflp's batch-invariant decoding (each utterance's
conv features normalised over its own frames: the same result at any batch size).

## Data

`python -m comflp corpus` (seed {cfg['seed']}, espeakng-loader {corpus['espeakng_loader']}):
{cfg['num_train']} train / {cfg['num_dev']} dev / {cfg['num_test']} test utterances of
{cfg['min_chars']}-{cfg['max_chars']} characters drawn Zipf-weighted (exponent {cfg['zipf_exponent']})
from {cfg['vocab_size']} characters, spoken by {cfg['speakers_train']}/{cfg['speakers_dev']}/{cfg['speakers_test']}
disjoint synthetic speakers (voice variant, pitch, range, rate), with per-utterance prosody jitter,
silence trimming, random gain and white noise at {cfg['snr_db'][0]:.0f}-{cfg['snr_db'][1]:.0f} dB SNR; 16 kHz mono.

## Recipe

```bash
python -m comflp.demo train      # exp/demo-12l-train/{{train.log,metrics.jsonl}}, then this directory
python -m comflp.demo card       # this card, results.json, training_curve.png
```

AdamW (lr 5e-4, betas 0.9/0.98, weight decay 0.01), 300 warm-up steps then cosine decay over
8,000 steps, length-sorted batches of at most 16 s of padded audio, gradient clipping at 5,
hidden dropout 0.05, no SpecAugment; the best dev checkpoint is shipped. Deterministic from the
seed on a given machine and torch build (the thread count changes float rounding); this model
was trained with 2 CPU threads in about 53 minutes, on zero-padded batches through its
group-norm conv encoder (what `python -m comflp.demo train --pad_audio` does; the recipe now
trains batch-invariantly by default).

Dev CER during training, decoded then with padded batches of 32 (curve in `training_curve.png`):

| step | train loss | dev CER (%) |
|---:|---:|---:|
{curve_rows}

## Pruning table (test CER, no fine-tuning)

The baseline that layer-pruning search must beat. Full model: **{100 * res['test_cer']:.2f}%**.

Six of twelve layers removed:

| removed | test CER (%) |
|---|---:|
{six}

One layer removed:

| removed layer | test CER (%) |
|---:|---:|
{single}
"""
    out = Path(model_dir) / "README.md"
    atomic.write_text(out, text)
    log.info("model card -> %s", out)
    return out
