"""The model card of every model comflp writes: ``README.md`` with the Hugging Face YAML header, rendered from
a record kept beside it (``comflp_card.json``).

The record says what was done to which model:

- ``base_model``: the unpruned source (hub id or absolute path); a model pruned or healed from a comflp model
  inherits its record, so the base stays the original and the removed layers are numbered in it;
- ``architecture``, ``model_type``;
- ``stacks``: per stack (``encoder``; an encoder-decoder model's ``decoder`` too) the depth of the base and the
  1-based layers of the base that are gone;
- ``strategy``: the strategy file, rank, coarse score and measure the layers came from (when they did);
- ``repair``: the repair folded into the weights (``comflp.repair``), ``healing``: the fine-tuning run
  (epochs, distillation, learning rate, validation CER), ``averaged``: the epochs averaged;
- ``parameters``: before (the base) and after;
- ``commands``: the command lines that made it, oldest first;
- ``tests``: one row per test set ``comflp test`` scored it on (CER/WER, utterances, RTF).

The card's header comes from ``huggingface_hub``'s ``ModelCardData`` (``base_model``, ``pipeline_tag``,
``tags``, ``library_name`` and a ``model-index`` with the test results), so the Hub and ``ModelCard.load``
read it; the body is rendered from the same record. ``comflp test`` adds its row to the record and renders
the card again, atomically, only when the card is still the one comflp rendered (a card the user edited is
left alone, with a warning).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from . import atomic
from .artifacts import CARD_RECORD_FILE, MODEL_CARD_FILE, WRITTEN_BY, source_id
from .errors import ComflpError

log = logging.getLogger(__name__)

PIPELINE_TAG = "automatic-speech-recognition"
_RATE_NAMES = {"char": "CER", "word": "WER"}


def read_record(model_dir: str | os.PathLike) -> dict | None:
    """The card record of a model comflp wrote (``comflp_card.json``), or None (a hub id, a model from
    elsewhere, an unreadable record)."""
    path = Path(model_dir) / CARD_RECORD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == WRITTEN_BY else None


def _in_base(kept_before: list[int], removed_now: Sequence[int]) -> list[int]:
    """Layers removed now (1-based among the ``kept_before`` layers of the base) as layers of the base.

    >>> _in_base([1, 2, 4, 5, 6], [3, 5])
    [4, 6]
    """
    return [kept_before[i - 1] for i in removed_now]


def pruning_record(source: str | os.PathLike, source_model, model, removed: dict[str, Sequence[int]], *,
                   strategy: dict | None = None, repair: dict | None = None,
                   command: str | None = None) -> dict:
    """The record of ``model``, made from ``source_model`` (loaded from ``source``) by removing the 1-based
    ``removed`` layers of each stack (``{"encoder": [...], "decoder": [...]}``).

    A source comflp wrote passes its record on: the base model, the layers it had already lost (the new ones
    are renumbered in the base), its commands and repair; its healing and tests described another model and
    are dropped.
    """
    from .model import count_parameters, num_layers

    parent = read_record(source) if Path(source).is_dir() else None
    record = {"written_by": WRITTEN_BY, "base_model": source_id(source), "architecture": type(model).__name__,
              "model_type": model.config.model_type, "stacks": {}, "parameters": {
                  "before": count_parameters(source_model), "after": count_parameters(model)},
              "commands": []}
    for stack in ("encoder", "decoder"):
        try:
            depth = num_layers(source_model, stack)
        except Exception:  # a model without this stack
            continue
        record["stacks"][stack] = {"layers": depth, "removed": sorted(removed.get(stack, ()))}
    if "decoder" in record["stacks"]:  # Whisper's word timestamps read the alignment heads' cross-attention
        record["alignment_heads"] = len(getattr(model.generation_config, "alignment_heads", None) or [])
    if parent is not None:
        record["base_model"] = parent["base_model"]
        record["parameters"]["before"] = parent["parameters"]["before"]
        record["commands"] = list(parent.get("commands", []))
        for stack, now in record["stacks"].items():
            before = parent["stacks"].get(stack, {"layers": now["layers"], "removed": []})
            kept = [i for i in range(1, before["layers"] + 1) if i not in set(before["removed"])]
            now.update(layers=before["layers"], removed=sorted(before["removed"] + _in_base(kept, now["removed"])))
        for key in ("strategy", "repair"):
            if parent.get(key):
                record.setdefault("history", []).append({key: parent[key]})
    if strategy:
        record["strategy"] = strategy
    if repair:  # the repair's settings and calibration set; its per-cut maps stay in the repair's own record
        record["repair"] = {k: v for k, v in repair.items() if k != "cuts"}
    if command:
        record["commands"].append(command)
    return record


def strategy_source(strategy, path: str | os.PathLike, rank: int) -> dict:
    """What a card says of the strategy file (a ``comflp.strategy.StrategyFile`` read from ``path``) whose
    candidate ``rank`` gave the layers: the file, the rank, the coarse score, the measure and the candidate's
    fine-search error rate."""
    picked = strategy.pick(rank)
    return {"file": source_id(path), "rank": rank, "score": picked.score,
            "measure": strategy.meta.get("select_measure"), "fine_error_rate": picked.cer,
            "error_rate_name": strategy.meta.get("error_rate", "CER")}


def with_healing(record: dict, healing: dict) -> dict:
    """``record`` with the fine-tuning run that healed the model (its test rows dropped: other weights)."""
    out = copy.deepcopy(record)
    out["healing"] = healing
    out.pop("tests", None)
    out.pop("averaged", None)
    return out


def with_average(record: dict, epochs: Sequence[int], *, command: str | None = None) -> dict:
    """``record`` of a checkpoint average of ``epochs`` (its tests dropped)."""
    out = copy.deepcopy(record)
    out["averaged"] = {"epochs": list(epochs)}
    out.pop("tests", None)
    if command:
        out["commands"] = [*out.get("commands", []), command]
    return out


def with_test(record: dict, row: dict) -> dict:
    """``record`` with the test row ``row`` (``data``, ``unit``, ``error_rate``, ``num_utterances``, ``rtf``),
    replacing an earlier row of the same data."""
    out = copy.deepcopy(record)
    out["tests"] = [t for t in out.get("tests", []) if t.get("data") != row["data"]] + [row]
    return out


def _layers_text(layers: Sequence[int]) -> str:
    return ", ".join(map(str, layers)) if layers else "none"


def render(record: dict, *, name: str) -> str:
    """The card (``README.md`` text) of ``record`` for the model dir called ``name``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    stacks = record.get("stacks", {})
    tests = record.get("tests", [])
    results = [EvalResult(task_type=PIPELINE_TAG, task_name="Speech recognition", dataset_type=t["data"],
                          dataset_name=Path(t["data"]).name or t["data"], metric_type=_RATE_NAMES[t["unit"]].lower(),
                          metric_name=f"test {_RATE_NAMES[t['unit']]}", metric_value=100 * t["error_rate"])
               for t in tests]
    tags = ["comflp", "layer-pruning", record["model_type"],
            "ctc" if "decoder" not in stacks else "encoder-decoder"]
    data = ModelCardData(base_model=record["base_model"], pipeline_tag=PIPELINE_TAG, library_name="transformers",
                         tags=tags, model_name=name if results else None, eval_results=results or None)
    what = ("with layers removed from" if any(s["removed"] for s in stacks.values())
            else "fine-tuned, all layers kept, from")
    parts = [f"---\n{data.to_yaml()}\n---\n", f"# {name}\n",
             f"`{record['architecture']}` {what} `{record['base_model']}` by comflp (CoMFLP layer pruning, "
             "InterSpeech 2023). It is a plain checkpoint: `transformers` loads it without comflp.\n",
             "## Layers removed\n", "| stack | layers in the base | removed (1-based, of the base) | left |",
             "|---|---:|---|---:|"]
    for stack, s in stacks.items():
        parts.append(f"| {stack} | {s['layers']} | {_layers_text(s['removed'])} | {s['layers'] - len(s['removed'])} |")
    parts.append("")
    strategy = record.get("strategy")
    if strategy:
        score = f", coarse score {strategy['score']:.4f}" if strategy.get("score") is not None else ""
        measure = f" ({strategy['measure']})" if strategy.get("measure") else ""
        fine = (f"; fine-search {strategy['error_rate_name']} {100 * strategy['fine_error_rate']:.2f}%"
                if strategy.get("fine_error_rate") is not None else "")
        parts.append(f"Chosen as candidate {strategy.get('rank', 1)} of the strategy file "
                     f"`{strategy['file']}`{score}{measure}{fine}.\n")
    else:
        parts.append("The layers were named directly (`--layers`), not read from a strategy file.\n")
    repair = record.get("repair")
    if repair:
        parts.append(f"Repaired at the cut without training: `{repair.get('kind')}` maps (ridge "
                     f"{repair.get('ridge')}) fitted on {repair.get('calibration', {}).get('utterances', '?')} "
                     f"utterances and folded into the kept weights.\n")
    parts += ["## Healing\n"]
    healing = record.get("healing")
    if healing:
        distill = (f", distilled from the unpruned model (weight {healing['distill_weight']}, temperature "
                   f"{healing['temperature']})" if healing.get("distill") else ", without distillation")
        valid = (f"; validation CER {100 * healing['valid_cer']:.2f}% (before healing "
                 f"{100 * healing['valid_cer_before']:.2f}%)" if healing.get("valid_cer") is not None
                 and healing.get("valid_cer_before") is not None else "")
        lora = (f", LoRA adapters of rank {healing['lora_rank']} (alpha {healing['lora_alpha']}) on the layers' "
                "linear maps, merged into the weights" if healing.get("lora_rank") else "")
        parts.append(f"Fine-tuned for {healing['epochs']} epoch(s) on `{healing['data']}` at learning rate "
                     f"{healing['lr']}{lora}{distill}{valid}.\n")
    else:
        parts.append("Not fine-tuned after pruning: expect a higher error rate than the base until it is "
                     "healed (`comflp finetune`).\n")
    if record.get("averaged"):
        parts.append(f"The weights are the average of epochs {_layers_text(record['averaged']['epochs'])}.\n")
    p = record["parameters"]
    share = 100 * (1 - p["after"] / p["before"]) if p["before"] else 0.0
    parts += ["## Size\n", "| | parameters |", "|---|---:|", f"| base | {p['before']:,} |",
              f"| this model | {p['after']:,} ({share:.1f}% fewer) |", ""]
    parts += ["## Test results\n"]
    if tests:
        parts += ["| test set | utterances | error rate | real-time factor |", "|---|---:|---:|---:|"]
        for t in tests:
            parts.append(f"| `{t['data']}` | {t['num_utterances']} | {_RATE_NAMES[t['unit']]} "
                         f"{100 * t['error_rate']:.2f}% | {t['rtf']:.4f} |")
        parts.append("\nGreedy decoding by `comflp test` (batch-invariant: the same at any batch size).\n")
    else:
        parts.append("Not tested yet: `comflp test --model <this dir>` adds its results here.\n")
    commands = record.get("commands", [])
    if commands:
        parts += ["## Reproduce\n", "```bash", *commands, "```\n"]
    parts += ["## Use\n", "```python", "from transformers import pipeline", "",
              f'asr = pipeline("{PIPELINE_TAG}", model="<this dir>")']
    if "decoder" in stacks:
        # transformers' pipeline beam-searches Whisper (5 beams) unless told; comflp decodes greedily
        parts += ['print(asr("speech.wav", generate_kwargs={"num_beams": 1})["text"])  # greedy, as comflp test']
        if record.get("alignment_heads"):
            parts += ['print(asr("speech.wav", return_timestamps="word")["chunks"])  # word timestamps', "```\n"]
        else:
            parts += ["```\n", "Word timestamps are unavailable: no decoder layer left holds an alignment head "
                      "(`generation_config.alignment_heads`).\n"]
    else:
        parts += ['print(asr("speech.wav")["text"])', "```\n"]
    parts += ["`comflp export --model <this dir> --format " + ("ct2" if "decoder" in stacks else "onnx")
              + " --output <dir>` writes it for " + ("CTranslate2 (faster-whisper)" if "decoder" in stacks
                                                      else "ONNX Runtime") + ", checked against PyTorch.\n"]
    text = "\n".join(parts)
    ModelCard(text, ignore_metadata_errors=False)  # huggingface_hub's own check of the header
    return text


def card_files(record: dict, *, model_dir: str | os.PathLike) -> dict[str, str]:
    """The card and its record as files (name -> text) for the model saved to ``model_dir``
    (``comflp.model.save_model(extra_text=...)``)."""
    return {CARD_RECORD_FILE: json.dumps(record, indent=2, ensure_ascii=False) + "\n",
            MODEL_CARD_FILE: render(record, name=Path(model_dir).resolve().name)}


def add_test(model_dir: str | os.PathLike, row: dict) -> bool:
    """Add a test row to the card of the comflp model in ``model_dir`` and render the card again.

    Nothing happens (False) when ``model_dir`` holds no comflp record. A card that is no longer the one the
    record renders (edited by hand) is not replaced: the record gets the row and a warning says so.
    """
    from .artifacts import output_lock

    model_dir = Path(model_dir)
    record = read_record(model_dir)
    if record is None:
        return False
    card = model_dir / MODEL_CARD_FILE
    name = model_dir.resolve().name
    try:
        with output_lock(card):
            try:
                ours = card.read_text(encoding="utf-8") == render(record, name=name)
            except FileNotFoundError:
                ours = True
            except (OSError, UnicodeDecodeError):
                ours = False
            updated = with_test(record, row)
            atomic.write_json(model_dir / CARD_RECORD_FILE, updated)
            if ours:
                atomic.write_text(card, render(updated, name=name))
            else:
                log.warning("%s was edited since comflp wrote it: left as it is (the test result is in %s)",
                            card, model_dir / CARD_RECORD_FILE)
    except (OSError, ComflpError) as err:  # a read-only model dir, or another writer: the test itself stands
        log.warning("the model card in %s was not updated: %s", model_dir, str(err).splitlines()[0])
        return False
    return ours
