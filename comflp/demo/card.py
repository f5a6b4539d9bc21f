"""Measure a shipped demo model and write its model card (``models/demo-<L>l/README.md``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import atomic
from ..artifacts import ExperimentDir
from .layout import ShippedModelDir, corpus_manifest
from ..errors import ComflpError
from .corpus import read_corpus
from ..heads import head_of
from ..model import count_parameters, load_model, num_layers
from ..paths import demo_split
from ..verify import FineSearch

log = logging.getLogger(__name__)

# how demo-12l was trained, before the recipe recorded its settings in the experiment dir
DEMO_12L_RECIPE = {"steps": 8000, "pad_audio": True, "minutes": 53, "threads": 2}


def half_sets(num_layers: int) -> dict[str, list[int]]:
    """Structured ways to remove half of the layers: every other layer, and the first, middle and last halves.

    >>> half_sets(4)["middle 2 (2-3)"]
    [2, 3]
    """
    k = num_layers // 2
    mid = (num_layers - k) // 2 + 1
    layers = range(1, num_layers + 1)
    odd, even = [i for i in layers if i % 2][:k], [i for i in layers if i % 2 == 0][:k]

    def spell(picked: list[int]) -> str:
        return ",".join(map(str, picked)) if len(picked) <= 3 else f"{picked[0]},{picked[1]},...,{picked[-1]}"

    return {
        f"odd layers ({spell(odd)})": odd,
        f"even layers ({spell(even)})": even,
        f"first {k} (1-{k})": list(range(1, k + 1)),
        f"middle {k} ({mid}-{mid + k - 1})": list(range(mid, mid + k)),
        f"last {k} ({num_layers - k + 1}-{num_layers})": list(range(num_layers - k + 1, num_layers + 1)),
    }


def searched_picks(loaded, k: int, *, batch_size: int = 32, stack: str = "encoder") -> dict[str, list[int]]:
    """CoMFLP's pick (the paper's DC at batch 4 over 10 batches of train, exact top-10, fine search on dev)
    and GLP's pick (greedy by dev CER), both searched on the whole dev split, of the ``stack`` layers."""
    from ..stages import comflp_search, glp

    dev = FineSearch(loaded, read_corpus(demo_split("dev")), batch_size=batch_size, stack=stack)
    # a decoder is measured under teacher forcing: its measuring utterances need their transcripts
    train = read_corpus(demo_split("train"), require_text=stack == "decoder")
    comflp = comflp_search(loaded, train, dev, k, progress=True).best.pruned
    glp_pick = glp(dev, k).path[-1].pruned
    return {f"CoMFLP's pick ({','.join(map(str, comflp))})": comflp, f"GLP's pick ({','.join(map(str, glp_pick))})": glp_pick}


def pruning_table(model_dir: Path, *, batch_size: int = 32, search_picks: bool = True, stack: str = "encoder") -> dict:
    """Test-split CER of the full model, every single-layer removal, and removals of half of the layers
    (structured ones, and CoMFLP's and GLP's picks when ``search_picks``) of the ``stack`` layers."""
    loaded = load_model(model_dir, need_tokenizer=True, allow_encoder_decoder=True)
    L = num_layers(loaded.model, stack)
    results: dict = {"num_layers": L, "num_parameters": count_parameters(loaded.model)}
    halves = half_sets(L)
    if search_picks:
        halves.update(searched_picks(loaded, L // 2, batch_size=batch_size, stack=stack))
    for split in ("dev", "test"):
        fine = FineSearch(loaded, read_corpus(demo_split(split)), batch_size=batch_size, stack=stack)
        sets = [[]] if split == "dev" else [[]] + [[i] for i in range(1, L + 1)] + list(halves.values())
        rates = [r.rate for r in fine.evaluate(sets)]
        results[f"{split}_cer"] = rates[0]
        if split == "test":
            results["single"] = {str(i): rates[i] for i in range(1, L + 1)}
            results["half"] = dict(zip(halves, rates[L + 1:]))
    return results


def _training_curve(exp: ExperimentDir) -> list[dict]:
    """The dev CER rows of a demo CTC model's training run: {step, train_loss, dev_cer, elapsed_s}."""
    settings = exp.settings() or {}
    if "steps" in settings:  # the recipe before it ran on the fine-tuning loop: a row every --eval_every steps
        return exp.read_metrics(key="step")
    return [{"step": r["update"], "train_loss": r["train_loss"], "dev_cer": r["valid_cer"], "elapsed_s": r["seconds"]}
            for r in exp.read_metrics() if r["epoch"] > 0]


def _recipe(model_dir: Path, exp_dir: Path, metrics: list[dict]) -> dict:
    """Steps, padding, threads and minutes of the training run: from its experiment dir, else recorded earlier."""
    settings = ExperimentDir(exp_dir).settings() if Path(exp_dir).is_dir() else None
    if settings and metrics and "elapsed_s" in metrics[-1]:
        # a resumed run restarts its clock: add up the segments
        seconds, last = 0.0, 0.0
        for row in metrics:
            if row["elapsed_s"] < last:
                seconds += last
            last = row["elapsed_s"]
        steps = settings["steps"] if "steps" in settings else settings["max_updates"]
        return {"steps": steps, "pad_audio": bool(settings["pad_audio"]), "threads": 2,
                "minutes": round((seconds + last) / 60)}
    return ShippedModelDir(model_dir).results().get("recipe") or DEMO_12L_RECIPE


def write_card(model_dir: Path, exp_dir: Path, *, batch_size: int = 32, search_picks: bool = True) -> Path:
    """Measure a shipped demo model and write its card, ``results.json`` and training curve beside it (the card
    of its head kind, :data:`CARDS`)."""
    model_dir = Path(model_dir)
    kind = head_of(load_model(model_dir, need_tokenizer=True, allow_encoder_decoder=True).model).name
    return CARDS[kind](model_dir, exp_dir, batch_size=batch_size, search_picks=search_picks)


def _write_ctc_card(model_dir: Path, exp_dir: Path, *, batch_size: int, search_picks: bool) -> Path:
    """A CTC demo model's card: single-layer and half-depth pruning tables, the training curve and recipe."""
    from ..plots import curves

    res = pruning_table(model_dir, batch_size=batch_size, search_picks=search_picks)
    L, name = res["num_layers"], model_dir.name
    metrics_file = ExperimentDir(exp_dir).metrics_file
    if metrics_file.exists():
        metrics = _training_curve(ExperimentDir(exp_dir))
        curve = ShippedModelDir(model_dir).training_curve
        curves({"dev CER (%)": ([m["step"] for m in metrics], [100 * m["dev_cer"] for m in metrics])}, curve,
               xlabel="optimizer step", ylabel="dev CER (%)", title=f"{name} training")
    else:  # a fresh clone has no training run: keep the curve recorded when the model was trained
        shipped = ShippedModelDir(model_dir)
        metrics = shipped.results().get("training", [])
        if not metrics:
            raise ComflpError(f"no training metrics: neither {metrics_file} nor a 'training' entry in "
                              f"{shipped.results_file}")
        log.info("training curve from %s (no %s)", shipped.results_file, metrics_file)
    res["recipe"] = _recipe(model_dir, exp_dir, metrics)
    res["training"] = [{k: m[k] for k in ("step", "train_loss", "dev_cer")} for m in metrics]
    atomic.write_json(ShippedModelDir(model_dir).results_file, res)
    corpus = json.loads(corpus_manifest(demo_split("train").parent).read_text(encoding="utf-8"))
    single = "\n".join(f"| {i} | {100 * r:.2f} |" for i, r in res["single"].items())
    half = "\n".join(f"| {name} | {100 * r:.2f} |" for name, r in res["half"].items())
    curve_rows = "\n".join(f"| {m['step']} | {m['train_loss']:.3f} | {100 * m['dev_cer']:.2f} |" for m in metrics)
    cfg = corpus["config"]
    recipe = res["recipe"]
    searched = (" (CoMFLP: the paper's DC at batch 4 over 10 batches of the train split, exact top-10, fine "
                "search on the dev split; GLP: greedy by dev CER)" if search_picks else "")
    layers_flag = "" if L == 12 else f" --num_layers {L}"
    padding = ("on zero-padded batches through its group-norm conv encoder (what `python -m comflp.demo train "
               "--pad_audio` does; the recipe now trains batch-invariantly by default)" if recipe["pad_audio"] else
               "batch-invariantly (each utterance's conv features normalised over its own frames, as comflp decodes)")
    text = f"""---
language: zh
tags: [automatic-speech-recognition, ctc, wav2vec2, comflp, synthetic]
---

# {name}: a {L}-layer wav2vec2-style CTC model for the comflp demo

A small CTC model trained **from scratch** on comflp's embedded synthetic Mandarin corpus
(`AISHELL1/demo/`, espeak-ng speech). It exists so that every comflp command runs offline;
it is not a real-world ASR model.

| | |
|---|---|
| architecture | `Wav2Vec2ForCTC`, stable layer norm, {L} layers x 144 wide, 4 heads, FFN 576, group-norm conv front-end (7 convs, 64-128 channels) |
| parameters | {res['num_parameters']:,} |
| vocabulary | {cfg['vocab_size'] + 3} tokens: `<pad>` (CTC blank), `<unk>`, `|`, {cfg['vocab_size']} characters with distinct espeak-ng pronunciations |
| weights | `model.safetensors`, float16 |
| **dev CER** (200 utt.) | **{100 * res['dev_cer']:.2f}%** |
| **test CER** (200 utt.) | **{100 * res['test_cer']:.2f}%** |

Greedy CTC decoding, CER over the whole split (character units), measured by
`python -m comflp.demo card --model models/{name}` with comflp's batch-invariant decoding (each
utterance's conv features normalised over its own frames: the same result at any batch size).

## Data

`python -m comflp corpus` (seed {cfg['seed']}, espeakng-loader {corpus['espeakng_loader']}):
{cfg['num_train']} train / {cfg['num_dev']} dev / {cfg['num_test']} test utterances of
{cfg['min_chars']}-{cfg['max_chars']} characters drawn Zipf-weighted (exponent {cfg['zipf_exponent']})
from {cfg['vocab_size']} characters, spoken by {cfg['speakers_train']}/{cfg['speakers_dev']}/{cfg['speakers_test']}
disjoint synthetic speakers (voice variant, pitch, range, rate), with per-utterance prosody jitter,
silence trimming, random gain and white noise at {cfg['snr_db'][0]:.0f}-{cfg['snr_db'][1]:.0f} dB SNR; 16 kHz mono.

## Recipe

```bash
python -m comflp.demo train{layers_flag} --steps {recipe['steps']}   # exp/{name}-train/{{train.log,metrics.jsonl}}, then this directory
python -m comflp.demo card --model models/{name} --exp_dir exp/{name}-train   # this card, results.json, training_curve.png
```

AdamW (lr 5e-4, betas 0.9/0.98, weight decay 0.01), 300 warm-up steps then cosine decay over
{recipe['steps']:,} steps, length-sorted batches of at most 16 s of padded audio, gradient clipping at 5,
hidden dropout 0.05, no SpecAugment; the best dev checkpoint is shipped. Deterministic from the
seed on a given machine and torch build (the thread count changes float rounding); this model
was trained with {recipe['threads']} CPU threads in about {recipe['minutes']} minutes, {padding}.

Dev CER during training (curve in `training_curve.png`):

| step | train loss | dev CER (%) |
|---:|---:|---:|
{curve_rows}

## Pruning table (test CER, no fine-tuning)

The baseline that layer-pruning search must beat. Full model: **{100 * res['test_cer']:.2f}%**.

{L // 2} of {L} layers removed{searched}:

| removed | test CER (%) |
|---|---:|
{half}

One layer removed:

| removed layer | test CER (%) |
|---:|---:|
{single}
"""
    out = ShippedModelDir(model_dir).card
    atomic.write_text(out, text)
    log.info("model card -> %s", out)
    return out


def linspace_layers(num_layers: int) -> list[int]:
    """The layers distil-whisper's linspace choice removes from ``num_layers`` to keep half."""
    import numpy as np

    from ..search import linspace

    return linspace(np.eye(num_layers + 1), num_layers // 2).candidates[0].pruned


def _training_rows(model_dir: Path, exp_dir: Path) -> list[dict]:
    """The per-epoch rows of a ``comflp finetune`` run (epoch, train loss, validation CER): from its
    experiment dir, else as recorded in ``results.json`` when the model was shipped."""
    exp = ExperimentDir(exp_dir)
    if exp.metrics_file.exists():
        return [{k: r[k] for k in ("epoch", "train_loss", "valid_cer")} for r in exp.read_metrics()
                if r["epoch"] > 0 and r.get("train_loss") is not None]
    shipped = ShippedModelDir(model_dir)
    rows = shipped.results().get("training", [])
    if not rows:
        raise ComflpError(f"no training metrics: neither {exp.metrics_file} nor a 'training' entry in "
                          f"{shipped.results_file}")
    return rows


def _scores(res: dict, name: str) -> str:
    """The card's last rows of the model table (weights, dev and test CER) and how they were measured."""
    return (f"| weights | `model.safetensors`, float16 |\n| **dev CER** (200 utt.) | **{100 * res['dev_cer']:.2f}%** |\n"
            f"| **test CER** (200 utt.) | **{100 * res['test_cer']:.2f}%** |\n\nGreedy generation with the cache, CER "
            f"over the whole split, measured by\n`python -m comflp.demo card --model models/{name}`.\n")


def _stack_table(r: dict, stack: str) -> str:
    """The pruning tables of one stack (:func:`pruning_table`'s ``r``) in markdown: half its layers, then one."""
    half = "\n".join(f"| {n} | {100 * v:.2f} |" for n, v in r["half"].items())
    single = "\n".join(f"| {i} | {100 * v:.2f} |" for i, v in r["single"].items())
    return (f"{r['num_layers'] // 2} of {r['num_layers']} {stack} layers removed:\n\n| removed | test CER (%) |\n"
            f"|---|---:|\n{half}\n\nOne {stack} layer removed:\n\n| removed layer | test CER (%) |\n"
            f"|---:|---:|\n{single}")


def _two_stack_results(model_dir: Path, exp_dir: Path, *, batch_size: int, search_picks: bool) -> dict:
    """Both stacks' pruning tables, the training rows and curve, and the recipe of a two-stack demo model,
    written to its ``results.json`` (and returned)."""
    from ..plots import curves

    stacks = {stack: pruning_table(model_dir, batch_size=batch_size, search_picks=search_picks, stack=stack)
              for stack in ("encoder", "decoder")}
    enc, dec = stacks["encoder"], stacks["decoder"]
    rows = _training_rows(model_dir, Path(exp_dir))
    curves({"dev CER (%), 64-utterance subset": ([r["epoch"] for r in rows], [100 * r["valid_cer"] for r in rows])},
           ShippedModelDir(model_dir).training_curve, xlabel="epoch", ylabel="dev CER (%)",
           title=f"{model_dir.name} training")
    settings = ExperimentDir(exp_dir).settings() or {}
    recorded = ShippedModelDir(model_dir).results().get("recipe", {})
    recipe = {k: settings.get(k, recorded.get(k)) for k in ("lr", "epochs", "batch_size", "layerdrop")}
    recipe["averaged_epochs"] = ExperimentDir(exp_dir).averaged_epochs() or recorded.get("averaged_epochs")
    res = {"encoder_layers": enc["num_layers"], "decoder_layers": dec["num_layers"],
           "num_parameters": enc["num_parameters"], "dev_cer": enc["dev_cer"], "test_cer": enc["test_cer"],
           "stacks": stacks, "recipe": recipe, "training": rows}
    atomic.write_json(ShippedModelDir(model_dir).results_file, res)
    return res


def _write_speechllm_card(model_dir: Path, exp_dir: Path, *, batch_size: int, search_picks: bool) -> Path:
    """The card of the demo speech-LLM: the audio tower's and the LLM's pruning tables, the training curve, the
    recipe."""
    name = model_dir.name
    res = _two_stack_results(model_dir, exp_dir, batch_size=batch_size, search_picks=search_picks)
    recipe, rows, stacks = res["recipe"], res["training"], res["stacks"]
    config = json.loads(ShippedModelDir(model_dir).config_file.read_text())
    audio, text = config["audio_config"], config["text_config"]
    curve_rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.3f} | {100 * r['valid_cer']:.2f} |" for r in rows)
    averaged = recipe.get("averaged_epochs") or []
    searched = any(k.startswith(("CoMFLP", "GLP")) for r in stacks.values() for k in r["half"])
    picks = ("CoMFLP's pick: the paper's DC at batch 4 over 10 batches of the train split (the LLM's under teacher "
             "forcing, at the transcript's tokens), exact top-10, fine search on the dev split; GLP: greedy by dev "
             "CER." if searched else "CoMFLP's and GLP's picks are not in these tables (`card --no_search`); "
             "`comflp demo` tests CoMFLP's pick beside linspace, before and after healing.")
    card = f"""---
language: zh
tags: [automatic-speech-recognition, speech-llm, qwen2-audio, comflp, synthetic]
---

# {name}: a small speech-LLM for the comflp demo

A speech-LLM of Qwen2-Audio's architecture: the demo Whisper's trained encoder as its audio tower, a
projector, and a small Qwen2 LLM over characters, prompted by a chat template to transcribe; trained by
comflp's one training loop on its embedded synthetic Mandarin corpus (`AISHELL1/demo/`, espeak-ng
speech), so that comflp's speech-LLM commands run offline (`comflp demo --model models/{name}` prunes
the audio tower and the LLM in turn). It is not a real-world ASR model.

| | |
|---|---|
| architecture | `Qwen2AudioForConditionalGeneration`: audio tower {audio['encoder_layers']} layers, {audio['d_model']} wide; LLM (Qwen2) {text['num_hidden_layers']} layers, {text['hidden_size']} wide, {text['num_attention_heads']} heads ({text['num_key_value_heads']} key-value), FFN {text['intermediate_size']} |
| parameters | {res['num_parameters']:,} |
| vocabulary | {text['vocab_size']} tokens: Qwen's chat and audio tokens, printable ASCII, one token per character of the training transcripts |
| prompt | `<|im_start|>user\\n<|audio_bos|><|AUDIO|><|audio_eos|>Transcribe the audio.<|im_end|>\\n<|im_start|>assistant\\n` |
{_scores(res, name)}
## Recipe

```bash
python -m comflp.demo speechllm-init    # the start: exp/demo-speechllm-train/init (tower = demo-whisper's encoder)
python -m comflp finetune --model exp/demo-speechllm-train/init --whole_model --batch_size {recipe['batch_size']} --grad_accum 1 \\
    --lr {recipe['lr']} --epochs {recipe['epochs']} --test_num_batch 2 --valid_batch_size 32 --keep_best --output_dir {exp_dir}
python average_model_pts.py --exp_dir {exp_dir} --num {len(averaged) or 1}     # the best epochs by dev CER
python -m comflp.demo ship --model {exp_dir}/model_avg --output models/{name}
python -m comflp.demo card --model models/{name} --exp_dir {exp_dir}
```

Cross-entropy on the transcript's tokens inside the chat prompt, AdamW, linear warm-up over 10% of the
updates then linear decay, batches of {recipe['batch_size']} utterances (no LayerDrop: the family has none);
the averaged epochs were {averaged}. The second command resumes a killed run.

Dev CER during training (a 64-utterance dev subset; curve in `training_curve.png`):

| epoch | train loss | dev CER (%) |
|---:|---:|---:|
{curve_rows}

## Pruning tables (test CER, no fine-tuning)

Full model: **{100 * res['test_cer']:.2f}%**. Each stack pruned with the other whole (the audio tower is the
`encoder` stack, the LLM the `decoder`); linspace removes {linspace_layers(stacks['encoder']['num_layers'])}
of the tower and {linspace_layers(stacks['decoder']['num_layers'])} of the LLM. {picks}

### Audio tower

{_stack_table(stacks['encoder'], 'encoder')}

### LLM

{_stack_table(stacks['decoder'], 'decoder')}
"""
    out = ShippedModelDir(model_dir).card
    atomic.write_text(out, card)
    log.info("model card -> %s", out)
    return out


def _write_seq2seq_card(model_dir: Path, exp_dir: Path, *, batch_size: int, search_picks: bool) -> Path:
    """The card of the demo Whisper: both stacks' pruning tables, the training curve, the recipe."""
    name = model_dir.name
    res = _two_stack_results(model_dir, exp_dir, batch_size=batch_size, search_picks=search_picks)
    recipe, rows, stacks = res["recipe"], res["training"], res["stacks"]
    enc, dec = stacks["encoder"], stacks["decoder"]
    config = json.loads(ShippedModelDir(model_dir).config_file.read_text())

    def table(stack: str) -> str:
        return _stack_table(stacks[stack], stack)

    curve_rows = "\n".join(f"| {r['epoch']} | {r['train_loss']:.3f} | {100 * r['valid_cer']:.2f} |" for r in rows)
    averaged = recipe.get("averaged_epochs") or []
    text = f"""---
language: zh
tags: [automatic-speech-recognition, whisper, comflp, synthetic]
---

# {name}: a small Whisper-architecture model for the comflp demo

An encoder-decoder ASR model of Whisper's architecture trained **from scratch** on comflp's
embedded synthetic Mandarin corpus (`AISHELL1/demo/`, espeak-ng speech), so that every comflp
command on encoder-decoder models runs offline (`comflp demo --model models/{name}` prunes
both of its stacks). It is not a real-world ASR model.

| | |
|---|---|
| architecture | `WhisperForConditionalGeneration`, {enc['num_layers']} encoder + {dec['num_layers']} decoder layers, {config['d_model']} wide, {config['encoder_attention_heads']} heads, FFN {config['encoder_ffn_dim']}, 80 log-mel bins, a {2 * config['max_source_positions'] // 100}-s window |
| parameters | {res['num_parameters']:,} |
| vocabulary | {config['vocab_size']} tokens: `<pad>`, `<|startoftranscript|>`, `<|endoftext|>`, `<unk>` and one token per character of the training transcripts |
{_scores(res, name)}
## Recipe

```bash
python -m comflp.demo whisper-init      # the random start: exp/demo-whisper-train/init
python -m comflp finetune --model exp/demo-whisper-train/init --whole_model --batch_size {recipe['batch_size']} --grad_accum 1 \\
    --lr {recipe['lr']} --epochs {recipe['epochs']} --test_num_batch 2 --valid_batch_size 32 --output_dir {exp_dir}
python average_model_pts.py --exp_dir {exp_dir} --num {len(averaged) or 5}     # the best epochs by dev CER
python -m comflp.demo ship --model {exp_dir}/model_avg --output models/{name}
python -m comflp.demo card --model models/{name} --exp_dir {exp_dir}
```

Cross-entropy on the transcripts under teacher forcing, AdamW, linear warm-up over 10% of the
updates then linear decay, LayerDrop {recipe['layerdrop']}, batches of {recipe['batch_size']} utterances; the
averaged epochs were {averaged}. The first command resumes a killed run.

Dev CER during training (a 64-utterance dev subset; curve in `training_curve.png`):

| epoch | train loss | dev CER (%) |
|---:|---:|---:|
{curve_rows}

## Pruning tables (test CER, no fine-tuning)

Full model: **{100 * res['test_cer']:.2f}%**. Each stack pruned with the other whole; distil-whisper's
linspace choice (evenly spaced layers kept, the first and the last always) removes {linspace_layers(enc['num_layers'])}
of the encoder and {linspace_layers(dec['num_layers'])} of the decoder. CoMFLP's pick:
the paper's DC at batch 4 over 10 batches of the train split (a decoder's under teacher forcing),
exact top-10, fine search on the dev split; GLP: greedy by dev CER.

### Encoder

{table("encoder")}

### Decoder

{table("decoder")}
"""
    out = ShippedModelDir(model_dir).card
    atomic.write_text(out, text)
    log.info("model card -> %s", out)
    return out


# the card of each head kind's demo model
CARDS = {"ctc": _write_ctc_card, "seq2seq": _write_seq2seq_card, "speechllm": _write_speechllm_card}
