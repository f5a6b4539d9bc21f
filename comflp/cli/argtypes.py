"""argparse types and the one-line-error parser: every numeric flag of every command is range-checked by one
of these types.

A value outside its range ends in :class:`ArgumentParser`'s one-line error naming the flag, before anything
is loaded or written. This module imports nothing of comflp, so that every command, paper script, demo
module and bench can build its parser from it. A test walks every command's parser and fails on a numeric flag that
takes a bare ``int`` or ``float``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Iterator

# numpy's legacy seeding and torch.manual_seed both take [0, 2**32 - 1]; numpy refuses negatives and torch
# overflows past 2**64, so one range serves every command
SEED_MAX = 2**32 - 1


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, which a container or ``taskset`` may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads(text: str) -> int:
    """CPU threads: 1 to the CPUs this process may use. More only slows torch down, and a huge count makes
    every thread pool allocate its buffers (an out-of-memory error far from the flag)."""
    value = positive_int(text)
    cpus = available_cpus()
    if value > cpus:
        raise argparse.ArgumentTypeError(f"this machine gives this process {cpus} CPU(s); use at most {cpus}, "
                                         f"got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32 - 1], the range numpy and torch both accept."""
    value = _int(text, f"a seed in [0, {SEED_MAX}]")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, {SEED_MAX}], got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _float(text, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    value = _float(text, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _interval(low: float, high: float, *, low_open: bool, high_open: bool, name: str, doc: str):
    """An argparse type for a finite float in an interval, e.g. [0, 1) for ``low_open=False, high_open=True``."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(text: str) -> float:
        value = _float(text, f"a number in {shown}")
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return value

    check.__name__ = check.__qualname__ = name
    check.__doc__ = f"A float in {shown}: {doc}."
    return check


fraction = _interval(0, 1, low_open=False, high_open=False, name="fraction", doc="a weight between two terms")
probability_below_one = _interval(0, 1, low_open=False, high_open=True, name="probability_below_one",
                                  doc="a probability that may not be certain (LayerDrop, Adam's betas)")
open_unit_upper = _interval(0, 1, low_open=True, high_open=False, name="open_unit_upper",
                            doc="a share of variance to keep")
confidence = _interval(0.5, 1, low_open=False, high_open=True, name="confidence", doc="a one-sided confidence")


def epoch_or_last(text: str) -> int:
    """``--resume_epoch``: -1 (the last checkpoint), 0 (afresh) or an epoch number."""
    value = _int(text, "-1, 0 or an epoch number")
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (resume from last/), 0 (afresh) or an epoch, got {value}")
    return value


def str2bool(text: str) -> bool:
    """The paper's ``--flag true|false`` options; anything else is an error."""
    if text.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if text.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


# types a numeric flag may take (the parser walk in tests/test_cli.py checks every command against this)
NUMERIC_TYPES = (positive_int, non_negative_int, threads, seed, positive_float, non_negative_float, fraction,
                 probability_below_one, open_unit_upper, confidence, epoch_or_last)


# "comflp <command>" while the comflp dispatcher runs one (comflp.cli.main); None for the paper's scripts
_INVOKED_AS: str | None = None


@contextlib.contextmanager
def invoked_as(name: str) -> Iterator[None]:
    """Name the command being run, so usage lines and errors say ``comflp finetune`` rather than the paper
    script that shares its parser (``python clip_finetune_train.py``)."""
    global _INVOKED_AS
    before, _INVOKED_AS = _INVOKED_AS, name
    try:
        yield
    finally:
        _INVOKED_AS = before


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: <prog>: <what is wrong>`` and exit 2 (no usage dump).

    Flags that name one input two ways (``--dataset`` and a Kaldi dir flag) are exclusive: given both, the
    command would read one and silently ignore the other.
    """

    def __init__(self, *args, **kwargs) -> None:
        if _INVOKED_AS is not None:
            kwargs["prog"] = _INVOKED_AS
        super().__init__(*args, **kwargs)
        self.exclusive_inputs: list[tuple[str, list[argparse.Action]]] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, rest = super().parse_known_args(args, namespace)
        for flag, actions in self.exclusive_inputs:
            dest = flag.lstrip("-")
            # a value given on the command line is a new object, never the default itself (argparse's own
            # test for mutually exclusive flags); set_defaults keeps action.default in step
            given = [a.option_strings[0] for a in actions if getattr(parsed, a.dest, None) is not a.default]
            if getattr(parsed, dest, None) and given:
                self.error(f"{flag} and {' / '.join(given)} both name the input; give one of them")
        return parsed, rest

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def add_overwrite(p: argparse.ArgumentParser, what: str = "output") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing {what} written earlier by comflp (a path comflp did not write is "
                        "never replaced)")
