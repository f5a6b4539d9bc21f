"""Logging to the console and to a file in the experiment dir."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFile(logging.FileHandler):
    """A log file that is created by its first record (a command refused before it logs writes nothing) and
    that stops the command when it cannot be written: logging's own handler prints a traceback per record
    and carries on, so a full disk would scroll tracebacks and lose the log. The ``OSError`` raised names
    the log file and reaches the command's one-line error."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self._made: list[Path] = []  # the dirs its first record created, removed again if nothing could be written
        self._existed = True  # whether the file was there before this run (then it is never removed)

    def _open(self):
        parent = Path(self.baseFilename).parent
        self._made = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        self._existed = Path(self.baseFilename).exists()
        return super()._open()

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            # drop the stream: a later record (the error line itself) must not meet the same full disk
            logging.getLogger().removeHandler(self)
            with contextlib.suppress(OSError):
                self.close()
            with contextlib.suppress(OSError):
                if not self._existed and os.path.getsize(self.baseFilename) == 0:  # made by this run, empty
                    os.unlink(self.baseFilename)
                    for made in self._made:  # innermost first
                        made.rmdir()
            raise OSError(err.errno, err.strerror or str(err), self.baseFilename) from err
        super().handleError(record)


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
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
            handler = LogFile(path)
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
