"""Average fine-tuning checkpoints: ``average_model_pts.py`` / ``comflp average``.

Floating-point tensors are averaged (in float64, stored back in their dtype);
integer tensors (counters such as ``num_batches_tracked``) cannot be averaged
meaningfully and are taken from the newest checkpoint. The result is an HF
model at ``<exp_dir>/model_avg`` (config and processor files from the newest
checkpoint), which ``test_asr.py --output_dir <exp_dir>`` uses.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .artifacts import ExperimentDir, claim_dir, write_dir
from .errors import ComflpError

log = logging.getLogger("comflp.average")


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of float tensors; integer tensors from the last dict. All dicts must share keys and shapes."""
    if not state_dicts:
        raise ComflpError("nothing to average")
    keys = state_dicts[-1].keys()
    for i, sd in enumerate(state_dicts):
        if sd.keys() != keys:
            raise ComflpError(f"checkpoint {i + 1} has different parameters from the others")
    out = {}
    for k in keys:
        last = state_dicts[-1][k]
        if last.is_floating_point():
            acc = torch.zeros(last.shape, dtype=torch.float64)
            for sd in state_dicts:
                acc += sd[k].to(torch.float64)
            out[k] = (acc / len(state_dicts)).to(last.dtype)
        else:
            out[k] = last.clone()
    return out


def select_epochs(exp: ExperimentDir, *, last_epoch: int, num: int, mode: str) -> list[int]:
    """``last``: epochs last_epoch-num+1..last_epoch; ``valid``: the num with the best valid CER up to last_epoch."""
    if num < 1:
        raise ComflpError(f"--num must be positive, got {num}")
    if mode == "last":
        epochs = list(range(last_epoch - num + 1, last_epoch + 1))
        if epochs[0] < 1:
            raise ComflpError(f"cannot average {num} epochs ending at {last_epoch}")
        return epochs
    metrics = exp.metrics_file
    if not metrics.exists():
        raise ComflpError(f"--mode valid needs {metrics} (written by fine-tuning)")
    saved = set(exp.saved_epochs())
    rows = [r for r in exp.read_metrics()
            if 1 <= r["epoch"] <= last_epoch and r["epoch"] in saved and isinstance(r.get("valid_cer"), (int, float))]
    if len(rows) < num:
        raise ComflpError(f"{metrics} has {len(rows)} validated epoch(s) up to {last_epoch}; --num {num} asked")
    best = sorted(rows, key=lambda r: (r["valid_cer"], -r["epoch"]))[:num]
    return sorted(r["epoch"] for r in best)


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for corrupt files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ComflpError(f"cannot read checkpoint {path}: {reason} (corrupt or truncated file?)") from None


def average(exp: ExperimentDir, epochs: list[int], *, overwrite: bool = False, command: str | None = None) -> Path:
    """Average the checkpoints of ``epochs`` into ``exp``'s ``model_avg/`` (the last epoch's config and
    processor files beside the mean weights); its model card, when the epochs have one, says which epochs
    (and ``command``)."""
    from .modelcard import card_files, read_record, with_average

    dirs = [exp.epoch(e) for e in epochs]
    for e, d in zip(epochs, dirs):
        if not exp.weights(d).is_file():
            raise ComflpError(f"checkpoint of epoch {e} not found: {exp.weights(d)}")
    target = claim_dir(exp.averaged, overwrite=overwrite, flag="averaged model")
    averaged = average_state_dicts([_load_checkpoint(exp.weights(d)) for d in dirs])
    with write_dir(target, kind="model", overwrite=overwrite, flag="averaged model") as tmp:
        for f in dirs[-1].iterdir():
            if f != exp.weights(dirs[-1]) and f.is_file():
                shutil.copy2(f, tmp / f.name)
        save_file(averaged, str(exp.weights(tmp)), metadata={"format": "pt"})
        record = read_record(dirs[-1])
        if record is not None:
            for name, text in card_files(with_average(record, epochs, command=command), model_dir=target).items():
                (tmp / name).write_text(text, encoding="utf-8")
        exp.write_averaged_epochs(tmp, epochs)
    log.info("averaged epochs %s -> %s", epochs, target)
    return target
