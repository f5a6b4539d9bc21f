"""Logging to the console and to a file in the experiment dir."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: str | os.PathLike | None = None, *, level: int = logging.INFO) -> None:
    """Log INFO and above to stderr and, if given, append to ``log_file``."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    if log_file is not None:
        path = Path(log_file).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter(_FORMAT))
            root.addHandler(handler)


@contextlib.contextmanager
def logging_to(log_file: str | os.PathLike | None) -> Iterator[None]:
    """:func:`setup_logging` for the block only: the file handler it added is closed and removed afterwards,
    so a stage run inside a longer process (the demo pipeline) does not log the next stages to its file."""
    root = logging.getLogger()
    before = set(root.handlers)
    setup_logging(log_file)
    try:
        yield
    finally:
        for h in set(root.handlers) - before:
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
                h.close()
