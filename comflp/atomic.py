"""Atomic file writes: write to a temporary file beside the target, then rename.

An interrupted run therefore never leaves a truncated matrix, JSON or
checkpoint behind; the target is either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ComflpError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_link(path: str | os.PathLike) -> Path:
    """``path``, or where it points if it is a symbolic link: writing through a link replaces its target and
    keeps the link (a user who links ``exp/`` to another disk keeps that layout). A dangling link is refused
    in one line naming both ends, before anything is written."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if not target.exists():
        raise ComflpError(f"{path} is a symbolic link to {target}, which does not exist; create it or choose "
                          "another path")
    return target


# a Rust library's I/O error (safetensors: "... I/O error: No space left on device (os error 28)")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _named(err: BaseException, target: Path) -> OSError | None:
    """``err`` as an ``OSError`` naming ``target`` (not the temp name it met), or None if it is no I/O error."""
    if isinstance(err, OSError):
        number, reason = err.errno, err.strerror or str(err)
    else:
        found = _RUST_OS_ERROR.search(str(err))
        if found is None:
            return None
        number = int(found.group(1))
        reason = os.strerror(number)
    return OSError(number if number is not None else errno.EIO, reason, str(target))


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """I/O errors inside the block name ``target``: a full disk met while writing a temp file is reported as
    the output the user asked for."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only I/O errors are translated; the rest re-raised as they are
        named = _named(err, target)
        if named is None:
            raise
        raise named from err


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    ``suffix`` is kept on the temporary name for writers that insist on an
    extension (``np.save`` appends ``.npy`` otherwise). A link is written through
    (:func:`follow_link`); an I/O error names ``target`` and leaves no temp file.
    """
    target = follow_link(target)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            os.replace(tmp_path, target)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_npy(target: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, array)


def save_npz(target: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _usual_permissions(root: Path) -> None:
    """Give every file and dir under ``root`` the permissions the umask implies.

    mkstemp/mkdtemp, and some writers (safetensors), create 0600/0700 entries.
    """
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.comflp-old")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp dir beside ``target``; on success it replaces ``target`` whole.

    The old dir is renamed aside first and removed last, so at every instant
    either the old or the new complete dir exists (``.<target>.comflp-old``
    after a crash between the two renames; :func:`recover_dir` puts it back).
    Whether ``target`` may be replaced at all is decided by the caller
    (:mod:`comflp.artifacts`). A link is written through (:func:`follow_link`): its
    target is replaced, the link stays. An I/O error (a full disk) names ``target``
    and leaves no temp dir.
    """
    target = follow_link(target)
    with _naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        old = _aside(target)
        try:
            yield tmp
            _usual_permissions(tmp)
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def recover_dir(target: str | os.PathLike) -> Path:
    """``target``, restored from the aside copy if a crash hit between the renames of :func:`atomic_dir`."""
    target = Path(target)
    old = _aside(target)
    if not target.exists() and old.exists():
        old.rename(target)
    return target
