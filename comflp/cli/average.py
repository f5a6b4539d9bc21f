"""``comflp average`` / ``average_model_pts.py``: average fine-tuning checkpoints into an HF model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts import ExperimentDir
from ..average import average, select_epochs
from ..errors import ComflpError, exit_on_error
from ..logs import setup_logging
from .options import ArgumentParser, add_overwrite, command_line, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python average_model_pts.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp_dir", type=Path, required=True, help="fine-tuning output dir (holds epoch<N>/)")
    p.add_argument("--last_epoch", type=positive_int, default=None, help="newest epoch considered (default: the newest saved)")
    p.add_argument("--num", type=positive_int, default=5, help="checkpoints to average (default: %(default)s)")
    p.add_argument("--mode", choices=["valid", "last"], default="valid",
                   help="valid: the best by validation CER; last: the newest (default: %(default)s)")
    add_overwrite(p, "<exp_dir>/model_avg")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.exp_dir.is_dir():
        raise ComflpError(f"exp dir not found: {args.exp_dir}")
    exp = ExperimentDir(args.exp_dir)
    setup_logging(exp.command_log("average"))
    saved = exp.saved_epochs()
    if not saved:
        raise ComflpError(f"no epoch<N>/ checkpoints in {exp.root}")
    last = args.last_epoch if args.last_epoch is not None else saved[-1]
    epochs = select_epochs(exp, last_epoch=last, num=args.num, mode=args.mode)
    out = average(exp, epochs, overwrite=args.overwrite, command=command_line(parser, argv))
    print(out)
    return out
