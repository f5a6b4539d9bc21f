"""Average fine-tuning checkpoints: ``average_model_pts.py`` / ``comflp average``.

Floating-point tensors are averaged (in float64, stored back in their dtype);
integer tensors (counters such as ``num_batches_tracked``) cannot be averaged
meaningfully and are taken from the newest checkpoint. The result is an HF
model at ``<exp_dir>/model_avg`` (config and processor files from the newest
checkpoint), which ``test_asr.py --output_dir <exp_dir>`` uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import atomic
from .errors import ComflpError, exit_on_error
from .logs import setup_logging

log = logging.getLogger("comflp.average")

AVERAGED_MODEL = "model_avg"


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


def select_epochs(exp_dir: Path, *, last_epoch: int, num: int, mode: str) -> list[int]:
    """``last``: epochs last_epoch-num+1..last_epoch; ``valid``: the num with the best valid CER up to last_epoch."""
    if num < 1:
        raise ComflpError(f"--num must be positive, got {num}")
    if mode == "last":
        epochs = list(range(last_epoch - num + 1, last_epoch + 1))
        if epochs[0] < 1:
            raise ComflpError(f"cannot average {num} epochs ending at {last_epoch}")
        return epochs
    metrics = exp_dir / "metrics.jsonl"
    if not metrics.exists():
        raise ComflpError(f"--mode valid needs {metrics} (written by fine-tuning)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    rows = [r for r in rows if r["epoch"] <= last_epoch and r.get("valid_cer") is not None]
    if len(rows) < num:
        raise ComflpError(f"{metrics} has {len(rows)} validated epoch(s) up to {last_epoch}; --num {num} asked")
    best = sorted(rows, key=lambda r: (r["valid_cer"], -r["epoch"]))[:num]
    return sorted(r["epoch"] for r in best)


def average(exp_dir: Path, epochs: list[int]) -> Path:
    dirs = [exp_dir / f"epoch{e}" for e in epochs]
    for e, d in zip(epochs, dirs):
        if not (d / "model.safetensors").is_file():
            raise ComflpError(f"checkpoint of epoch {e} not found: {d / 'model.safetensors'}")
    averaged = average_state_dicts([load_file(str(d / "model.safetensors")) for d in dirs])
    target = exp_dir / AVERAGED_MODEL
    with atomic.atomic_dir(target) as tmp:
        for f in dirs[-1].iterdir():
            if f.name != "model.safetensors" and f.is_file():
                shutil.copy2(f, tmp / f.name)
        save_file(averaged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "averaged_epochs.json").write_text(json.dumps({"epochs": epochs}) + "\n")
    log.info("averaged epochs %s -> %s", epochs, target)
    return target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python average_model_pts.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp_dir", type=Path, required=True, help="fine-tuning output dir (holds epoch<N>/)")
    p.add_argument("--last_epoch", type=int, default=None, help="newest epoch considered (default: the newest saved)")
    p.add_argument("--num", type=int, default=5, help="checkpoints to average (default: %(default)s)")
    p.add_argument("--mode", choices=["valid", "last"], default="valid",
                   help="valid: the best by validation CER; last: the newest (default: %(default)s)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    exp: Path = args.exp_dir
    if not exp.is_dir():
        raise ComflpError(f"exp dir not found: {exp}")
    setup_logging(exp / "average.log")
    saved = sorted(int(d.name[5:]) for d in exp.glob("epoch*") if d.name[5:].isdigit())
    if not saved:
        raise ComflpError(f"no epoch<N>/ checkpoints in {exp}")
    last = args.last_epoch if args.last_epoch is not None else saved[-1]
    out = average(exp, select_epochs(exp, last_epoch=last, num=args.num, mode=args.mode))
    print(out)
    return out


if __name__ == "__main__":
    main()
