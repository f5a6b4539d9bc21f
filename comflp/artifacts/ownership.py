"""Who owns what on disk: comflp's outputs, their ownership marks and locks.

Rules every command follows (the checks live here, nowhere else):

- A path that does not exist, or an empty directory, may be written.
- A path comflp wrote earlier is replaced only with ``--overwrite``.
- A path comflp did not write is never replaced, with or without ``--overwrite``.
- Two processes writing one output: the second stops with one line (a
  non-blocking ``fcntl`` lock on a hidden file beside the output).

How comflp recognises its own outputs: a directory holds the mark file
``.comflp.json`` (``{"written_by": "comflp", "kind": ...}``); a JSON file has
a top-level ``"written_by": "comflp"``; an ``.npz`` holds a ``settings`` entry
whose JSON says so; an ``.npy`` matrix has its sidecar ``.json``; a PNG carries
``Software: comflp`` in its text chunk. Files inside a marked directory are
comflp's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import atomic
from ..errors import ComflpError

WRITTEN_BY = "comflp"
DIR_MARK = ".comflp.json"


def mark_dir(path: str | os.PathLike, kind: str) -> None:
    """Mark a directory as a comflp output of ``kind`` (model, experiment, test, ...)."""
    atomic.write_json(Path(path) / DIR_MARK, {"written_by": WRITTEN_BY, "kind": kind})


def dir_kind(path: str | os.PathLike) -> str | None:
    """The kind recorded in a directory's mark, or None if comflp did not mark it."""
    try:
        raw = json.loads((Path(path) / DIR_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw.get("kind") if isinstance(raw, dict) and raw.get("written_by") == WRITTEN_BY else None


def _inside_marked_dir(path: Path) -> bool:
    return dir_kind(path.parent) is not None


def _json_is_ours(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("written_by") == WRITTEN_BY


def _npz_is_ours(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "settings" in z.files and json.loads(str(z["settings"])).get("written_by") == WRITTEN_BY
    except Exception:  # a corrupt or foreign file is simply not ours
        return False


def _png_is_ours(path: Path) -> bool:
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return False
    return b"Software\x00" + WRITTEN_BY.encode() in head


def file_is_ours(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file comflp wrote (see the module docstring for how it tells)."""
    path = Path(path)
    if not path.is_file():
        return False
    if _inside_marked_dir(path):
        return True
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_is_ours(path)
    if suffix == ".npz":
        return _npz_is_ours(path)
    if suffix == ".npy":
        return _json_is_ours(path.with_suffix(".json"))
    if suffix == ".png":
        return _png_is_ours(path)
    return False


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ComflpError(f"{flag} {path}: {parent} is a file, not a directory")
            return


def _follow(path: str | os.PathLike, flag: str) -> Path:
    """The output ``path`` names: a symbolic link's target (written through, the link kept); a dangling link
    is refused naming the flag, before anything is written."""
    try:
        return atomic.follow_link(path)
    except ComflpError as err:
        raise ComflpError(f"{flag} {err}") from None


def claim_file(path: str | os.PathLike, *, overwrite: bool, flag: str = "--output") -> Path:
    """Check that comflp may write the file ``path`` (a link: its target); one line naming the path if not."""
    path = _follow(path, flag)
    if path.is_dir():
        raise ComflpError(f"{flag} {path} is a directory; a file path is needed here")
    _check_parents(path, flag)
    if not path.exists():
        return path
    if not file_is_ours(path):
        raise ComflpError(f"{flag} {path} exists and was not written by comflp; refusing to replace it "
                          "(choose another path)")
    if not overwrite:
        raise ComflpError(f"{flag} {path} exists (an earlier comflp output); pass --overwrite to replace it")
    return path


def claim_dir(path: str | os.PathLike, *, overwrite: bool, flag: str = "--output") -> Path:
    """Check that comflp may (re)create the directory ``path`` (a link: its target); one line naming the path
    if not."""
    path = _follow(path, flag)
    if path.exists() and not path.is_dir():
        raise ComflpError(f"{flag} {path} is a file; a directory is needed here")
    _check_parents(path, flag)
    if not path.exists() or not any(path.iterdir()):
        return path
    if dir_kind(path) is None:
        raise ComflpError(f"{flag} {path} exists and was not written by comflp; refusing to replace it "
                          "(choose another path)")
    if not overwrite:
        raise ComflpError(f"{flag} {path} exists (an earlier comflp output); pass --overwrite to replace it")
    return path


def check_output_dir(path: str | os.PathLike, *, flag: str = "--output_dir") -> Path:
    """The checks of :func:`open_output_dir` without creating anything: a command refuses a bad output before
    its work, and creates the dir only once its inputs have passed their own checks."""
    path = _follow(path, flag)
    if path.exists() and not path.is_dir():
        raise ComflpError(f"{flag} {path} is a file; a directory is needed here")
    _check_parents(path, flag)
    if path.is_dir() and any(path.iterdir()) and dir_kind(path) is None:
        raise ComflpError(f"{flag} {path} exists and was not written by comflp; refusing to write into it "
                          "(choose another path)")
    return path


def open_output_dir(path: str | os.PathLike, *, kind: str, flag: str = "--output_dir") -> Path:
    """Create or reuse a directory comflp writes several outputs into (an experiment or report dir).

    It may not exist, be empty, or be marked as comflp's; a non-empty directory
    comflp did not write is refused (nothing in it is touched). The files
    inside are then claimed one by one (:func:`claim_file`).
    """
    path = check_output_dir(path, flag=flag)
    made = [d for d in (path, *path.parents) if not d.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if dir_kind(path) is None:
        try:
            mark_dir(path, kind)
        except OSError:
            for d in made:  # innermost first: a dir that could not be marked is not left behind
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
    return path


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on output ``path`` for the block; a second holder gets one line.

    The lock is a non-blocking ``flock`` on ``.<name>.lock`` beside the output,
    released by the kernel if the process dies, so a killed run never leaves a
    stale lock behind.
    """
    path = atomic.follow_link(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = path.parent / f".{path.name}.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ComflpError(f"another comflp process is writing {path} (lock {lock_file}); "
                              "wait for it to finish or choose another output") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def write_dir(path: str | os.PathLike, *, kind: str, overwrite: bool, flag: str = "--output") -> Iterator[Path]:
    """Claim, lock and atomically (re)write the output directory ``path``; yields the temp dir to fill."""
    path = claim_dir(path, overwrite=overwrite, flag=flag)
    with output_lock(path), atomic.atomic_dir(path) as tmp:
        yield tmp
        mark_dir(tmp, kind)


def source_id(path: str | os.PathLike) -> str:
    """How outputs record a model or data dir: a local path as its absolute path (whatever the cwd), a hub id as is."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)
