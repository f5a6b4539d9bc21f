"""``comflp prepare-aishell`` / ``AISHELL1/prepare_aishell.py``: Kaldi dirs from an official AISHELL-1 download."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..aishell import prepare
from ..errors import exit_on_error
from ..logs import setup_logging
from ..paths import REPO_ROOT
from .options import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python AISHELL1/prepare_aishell.py",
                                description="Build AISHELL-1 Kaldi dirs (wav.scp, text, utt2spk, spk2utt) "
                                            "from the official corpus tree.")
    p.add_argument("corpus_root", type=Path, help="the official data_aishell dir (wav/ and transcript/ inside)")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "AISHELL1",
                   help="where aishell_{train,dev,test}/ are written (default: %(default)s)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    counts = prepare(args.corpus_root, args.output)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
