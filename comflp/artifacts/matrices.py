"""The matrix files: a paper-style ``.npy`` with its sidecar ``.json``, or one ``.npz`` of several measures; their
names (the paper's), what they record and the check that a search reads the model they were measured on."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Callable
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import ComflpError
from .ownership import WRITTEN_BY, claim_file, output_lock, source_id

def stack_suffix(stack: str) -> str:
    """The file-name suffix of ``stack``: the encoder (the only stack of a CTC model) keeps the paper's names;
    another stack's files get their own."""
    return "" if stack == "encoder" else f"_{stack}"


def dc_dump_name(mode: str, batch_size: int, iter_num: int, accum_batch: int = 1, *, unbiased: bool = False,
                 stack: str = "encoder") -> str:
    """The paper's DC file name: ``dc_mat_{mode}_bs{bs*accum}_iter{iter}.npy`` (``_decoder`` before ``.npy`` for
    a decoder stack)."""
    return (f"dc_mat_{mode}_bs{batch_size * accum_batch}_iter{iter_num}{'_unbiased' if unbiased else ''}"
            f"{stack_suffix(stack)}.npy")


def svcca_dump_name(batch_size: int, iter_num: int, mode: str, thre: float, *, stack: str = "encoder") -> str:
    """The paper's SVCCA file name: ``cca_mat_{bs*iter}{mode}_svthre{thre}.npy`` (``_decoder`` for a decoder)."""
    return f"cca_mat_{batch_size * iter_num}{mode}_svthre{thre}{stack_suffix(stack)}.npy"


def measures_name(batch_size: int, iter_num: int, sample_mode: str, *, stack: str = "encoder") -> str:
    """The default ``comflp measure`` file name (``_decoder`` for a decoder stack)."""
    return f"measures_bs{batch_size}_iter{iter_num}_{sample_mode}{stack_suffix(stack)}.npz"


def matrix_meta(*, model: str | os.PathLike, data: str, num_layers: int, stack: str, settings: dict,
                num_utterances: int, num_frames: int, num_batches: int, seconds: float, use_pretrained: bool = True,
                processes: int = 1, fingerprint: str | None = None) -> dict:
    """What a matrix file records: the model (path or hub id, and its content fingerprint) and data it was
    measured on (checked by :func:`check_matrix_model` before a search uses it), its depth and stack, the
    measuring settings and counts."""
    return {"model": source_id(model), **({"fingerprint": fingerprint} if fingerprint else {}),
            "data_dir": data, "num_layers": num_layers, "stack": stack,
            "use_pretrained": bool(use_pretrained), "settings": settings, "num_utterances": num_utterances,
            "num_frames": num_frames, "num_batches": num_batches, "processes": processes,
            "seconds": round(seconds, 3)}


def save_matrix(path: str | os.PathLike, matrix: np.ndarray, meta: dict, *, overwrite: bool) -> Path:
    """Write a paper-style ``.npy`` matrix and its sidecar ``.json`` (metadata, ownership)."""
    path = claim_file(path, overwrite=overwrite)
    with output_lock(path):
        atomic.write_json(path.with_suffix(".json"), {"written_by": WRITTEN_BY, **meta})
        atomic.save_npy(path, matrix)
    return path


def save_matrices(path: str | os.PathLike, matrices: dict[str, np.ndarray], meta: dict, *, overwrite: bool) -> Path:
    """Write several named matrices and their metadata to one ``.npz``."""
    path = claim_file(path, overwrite=overwrite)
    with output_lock(path):
        atomic.save_npz(path, settings=np.array(json.dumps({"written_by": WRITTEN_BY, **meta})), **matrices)
    return path


def _check_real_matrix(m: np.ndarray, where: str) -> np.ndarray:
    if m.dtype.kind not in "fiu" or m.dtype == bool:
        raise ComflpError(f"{where} holds a {m.dtype} array; a real-valued (float) matrix is needed")
    if m.dtype.kind != "f":
        raise ComflpError(f"{where} holds an integer matrix ({m.dtype}); correlation matrices are float")
    return m.astype(np.float64)


def load_matrices(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a ``.npz`` of ``comflp measure``: (matrices by name, metadata); one line if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ComflpError(f"matrix file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "settings" not in z.files:
                raise ComflpError(f"{path} has no 'settings' entry: not a file written by `comflp measure`")
            meta = json.loads(str(z["settings"]))
            mats = {k: _check_real_matrix(z[k], f"{path}:{k}") for k in z.files if k != "settings"}
    except ComflpError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ComflpError(f"cannot read {path} as an .npz of matrices: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not mats:
        raise ComflpError(f"{path} holds no matrices")
    return mats, meta


def load_matrix(path: str | os.PathLike, measure: str | None = None) -> tuple[np.ndarray, dict]:
    """One matrix and its metadata from a paper ``.npy`` (sidecar optional) or a ``.npz`` (entry ``measure``)."""
    path = Path(path)
    if path.suffix == ".npz":
        mats, meta = load_matrices(path)
        if measure not in mats:
            raise ComflpError(f"{path} holds {', '.join(sorted(mats))}, not {measure}")
        return mats[measure], meta
    if not path.is_file():
        raise ComflpError(f"matrix file not found: {path}")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ComflpError(f"cannot read {path} as a matrix (.npy): no NumPy header (empty or not a .npy file)")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ComflpError(f"cannot read {path} as a matrix (.npy): {reason}") from None
    if not isinstance(matrix, np.ndarray):
        raise ComflpError(f"{path} is not a single .npy matrix")
    meta: dict = {}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
    return _check_real_matrix(matrix, str(path)), meta


def check_matrix_model(meta: dict, *, num_layers: int, model: str | None, where: str,
                       fingerprint: Callable[[], str] | None = None) -> None:
    """A matrix measured on another model cannot rank this one's layers: compare the recorded depth, then the
    model. A model at another path is the same model when its content fingerprint (``fingerprint()``, of the
    loaded model: :func:`comflp.model.fingerprint`) equals the one recorded: a copy, or the checkpoint saved
    again with another generation config."""
    recorded = meta.get("num_layers")
    if recorded is not None and int(recorded) != num_layers:
        raise ComflpError(f"{where} was measured on a {recorded}-layer model ({meta.get('model', '?')}); "
                          f"this model has {num_layers} layers")
    if model is None or meta.get("model") is None or source_id(meta["model"]) == source_id(model):
        return
    if meta.get("fingerprint") and fingerprint is not None and fingerprint() == meta["fingerprint"]:
        return
    why = ("and its weights or config differ" if meta.get("fingerprint") and fingerprint is not None
           else "and the matrix records no content fingerprint to match a copy by")
    raise ComflpError(f"{where} was measured on {meta['model']}, not {model}, {why}; measure this model "
                      "or pass the matching --model")
