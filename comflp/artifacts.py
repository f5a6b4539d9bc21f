"""Who owns what on disk: comflp's outputs, their ownership marks, locks and the matrix files.

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
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import atomic
from .errors import ComflpError

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


# ---------------------------------------------------------------------------------------------
# the matrix files: paper-style .npy + sidecar .json, or one .npz of several measures


def _stack_suffix(stack: str) -> str:
    # the encoder (the only stack of a CTC model) keeps the paper's names; a decoder's matrices get their own
    return "" if stack == "encoder" else f"_{stack}"


def dc_dump_name(mode: str, batch_size: int, iter_num: int, accum_batch: int = 1, *, unbiased: bool = False,
                 stack: str = "encoder") -> str:
    """The paper's DC file name: ``dc_mat_{mode}_bs{bs*accum}_iter{iter}.npy`` (``_decoder`` before ``.npy`` for
    a decoder stack)."""
    return (f"dc_mat_{mode}_bs{batch_size * accum_batch}_iter{iter_num}{'_unbiased' if unbiased else ''}"
            f"{_stack_suffix(stack)}.npy")


def svcca_dump_name(batch_size: int, iter_num: int, mode: str, thre: float, *, stack: str = "encoder") -> str:
    """The paper's SVCCA file name: ``cca_mat_{bs*iter}{mode}_svthre{thre}.npy`` (``_decoder`` for a decoder)."""
    return f"cca_mat_{batch_size * iter_num}{mode}_svthre{thre}{_stack_suffix(stack)}.npy"


def measures_name(batch_size: int, iter_num: int, sample_mode: str, *, stack: str = "encoder") -> str:
    """The default ``comflp measure`` file name (``_decoder`` for a decoder stack)."""
    return f"measures_bs{batch_size}_iter{iter_num}_{sample_mode}{_stack_suffix(stack)}.npz"


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


def source_id(path: str | os.PathLike) -> str:
    """How outputs record a model or data dir: a local path as its absolute path (whatever the cwd), a hub id as is."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


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


# ---------------------------------------------------------------------------------------------
# the experiment dir of fine-tuning, averaging and testing


RUN_FILE = "run.json"
# transformers.utils.SAFE_WEIGHTS_NAME, spelled here so that reading a layout does not import transformers
WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
POSITION_FILE = "position.json"
HYPOTHESES_FILE = "hyp.txt"
METRICS_FILE = "metrics.jsonl"
REPAIR_FILE = "comflp_repair.json"  # beside a pruned model: the repair folded into it (comflp.repair)
MODEL_CARD_FILE = "README.md"  # the model card of every model comflp writes (comflp.modelcard), HF's name
ONNX_FILE = "model.onnx"  # an ONNX export's graph and weights (comflp.export)
EXPORT_FILE = "comflp_export.json"  # in an export dir: what was exported and how it compared (comflp.export)
CARD_RECORD_FILE = "comflp_card.json"  # beside it: the record the card is rendered from (comflp.modelcard)
LAST = "last"
FINAL = "final"
AVERAGED = "model_avg"
BEST = "best"
TEST_REPORT = "test_asr.json"
AVERAGED_EPOCHS = "averaged_epochs.json"
_EPOCH_PREFIX = "epoch"


class ExperimentDir:
    """The layout of a fine-tuning experiment, known here only.

    ``run.json`` (the settings that define the run), ``metrics.jsonl`` (one
    row per epoch), ``epoch<N>/`` (HF checkpoints), ``last/`` (resumable
    state), ``final/``, ``model_avg/`` (averaged) and the test report.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def epoch(self, n: int) -> Path:
        return self.root / f"{_EPOCH_PREFIX}{n}"

    @property
    def last(self) -> Path:
        return self.root / LAST

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def averaged(self) -> Path:
        return self.root / AVERAGED

    @property
    def best(self) -> Path:
        """The checkpoint of the best validation CER (``--keep_best``)."""
        return self.root / BEST

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def test_report(self) -> Path:
        return self.root / TEST_REPORT

    @property
    def hypotheses(self) -> Path:
        """The test's hypotheses, one ``<utt> <text>`` line each (Kaldi's text layout)."""
        return self.root / HYPOTHESES_FILE

    def command_log(self, command: str) -> Path:
        """The log of one command run on this dir (``train``, ``average``, ``test_asr``)."""
        return self.root / f"{command}.log"

    @staticmethod
    def weights(checkpoint: Path) -> Path:
        """The weights file of a checkpoint dir (``epoch<N>/``, ``last/``, ...)."""
        return Path(checkpoint) / WEIGHTS_FILE

    @staticmethod
    def trainer_state(checkpoint: Path) -> Path:
        """Optimizer, scheduler and RNG states of the resumable ``last/``."""
        return Path(checkpoint) / TRAINER_STATE_FILE

    @staticmethod
    def position(checkpoint: Path) -> Path:
        """Where in the run ``last/`` stands (epoch, micro-batch, update, running loss)."""
        return Path(checkpoint) / POSITION_FILE

    def write_averaged_epochs(self, target: Path, epochs: list[int]) -> None:
        """Record in an averaged model dir (``target``, before it is renamed into place) which epochs it averages."""
        (Path(target) / AVERAGED_EPOCHS).write_text(json.dumps({"epochs": epochs}) + "\n")

    def averaged_epochs(self) -> list[int] | None:
        """The epochs ``model_avg/`` averages, or None if it has not been made."""
        f = self.averaged / AVERAGED_EPOCHS
        return json.loads(f.read_text(encoding="utf-8"))["epochs"] if f.is_file() else None

    def saved_epochs(self) -> list[int]:
        """Epochs with a complete HF checkpoint, ascending."""
        out = []
        for d in self.root.glob(f"{_EPOCH_PREFIX}*"):
            suffix = d.name[len(_EPOCH_PREFIX):]
            if suffix.isdigit() and self.weights(d).is_file():
                out.append(int(suffix))
        return sorted(out)

    def read_metrics(self, key: str = "epoch") -> list[dict]:
        """The rows of ``metrics.jsonl`` (each with an integer ``key``); one line naming the file and line if one is corrupt."""
        if not self.metrics_file.exists():
            return []
        rows = []
        for i, line in enumerate(self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get(key), int):
                    raise ValueError(f"no integer {key!r}")
            except ValueError as err:
                raise ComflpError(f"{self.metrics_file}:{i}: corrupt metrics row ({str(err).splitlines()[0]})") from None
            rows.append(row)
        return rows

    def write_metrics_row(self, row: dict, key: str = "epoch") -> None:
        """Add the row of one epoch (or ``key``), replacing an earlier row of it (a resumed run), atomically."""
        rows = [r for r in self.read_metrics(key) if r[key] != row[key]] + [row]
        rows.sort(key=lambda r: r[key])
        atomic.write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))

    def settings(self) -> dict | None:
        try:
            raw = json.loads((self.root / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return raw.get("settings") if isinstance(raw, dict) else None

    def _clear(self) -> None:
        import shutil

        for entry in self.root.iterdir():
            name = entry.name
            ours = (name in (LAST, FINAL, AVERAGED, BEST, METRICS_FILE, RUN_FILE, TEST_REPORT, HYPOTHESES_FILE)
                    or (name.startswith(_EPOCH_PREFIX) and name[len(_EPOCH_PREFIX):].isdigit()))
            if ours:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    @classmethod
    def open(cls, root: str | os.PathLike, *, settings: dict, kind: str, afresh: bool,
             flag: str = "--output_dir", restart_flags: str = "--overwrite or --resume_epoch 0") -> "ExperimentDir":
        """Create or reopen an experiment dir for a run with ``settings``.

        Reopening continues only the same experiment: if the recorded settings
        differ, one line names the differing settings, unless ``afresh`` (then
        comflp's own entries are removed and the run starts over; nothing else
        in the dir is touched). A non-empty dir comflp did not write is refused.
        """
        exp = cls(open_output_dir(root, kind=kind, flag=flag))
        recorded = exp.settings()
        if recorded is not None and not afresh:
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            if changed:
                diffs = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in changed[:4])
                more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
                raise ComflpError(f"{exp.root} holds another experiment ({diffs}{more}); pass {restart_flags} "
                                  f"to start afresh there, or choose another {flag}")
        if afresh:
            exp._clear()
        atomic.write_json(exp.root / RUN_FILE, {"written_by": WRITTEN_BY, "settings": settings})
        return exp


class DemoDir(ExperimentDir):
    """The layout of a ``comflp demo`` run, known here only.

    Besides the experiment files of :class:`ExperimentDir` (``run.json``), every pruned variant (a layer
    stack and the method that chose its layers: ``comflp`` or the ``linspace`` baseline) has a strategy
    file, a pruned model, a fine-tuning dir and two test dirs. The encoder's CoMFLP variant keeps the names
    of the paper-style demo (``search.json``, ``pruned-<K>``, ``test_pruned``, ``finetune``, ``test_healed``);
    the others add ``_decoder`` and ``_linspace``.
    """

    @staticmethod
    def _suffix(stack: str, method: str) -> str:
        return ("" if stack == "encoder" else f"_{stack}") + ("" if method == "comflp" else f"_{method}")

    def done_marker(self, stage: int, name: str) -> Path:
        return self.root / ".done" / f"{stage}-{name}"

    def done_markers(self) -> list[Path]:
        """The markers of the finished stages (each holds the stage's seconds)."""
        return sorted((self.root / ".done").glob("*-*"))

    def clear_done(self) -> None:
        import shutil

        shutil.rmtree(self.root / ".done", ignore_errors=True)

    @property
    def log_file(self) -> Path:
        return self.root / "demo.log"

    @property
    def dump(self) -> Path:
        return self.root / "dump"

    @property
    def figure(self) -> Path:
        return self.root / "figure"

    @property
    def paper_dump(self) -> Path:
        """Matrices measured with the paper's own padding (beside ``dump/``, under the same names)."""
        return self.dump / "paper"

    @property
    def search_log_dir(self) -> Path:
        return self.root / "log"

    def strategy(self, stack: str, method: str = "comflp") -> Path:
        return self.root / f"{'search' if method == 'comflp' else method}{_stack_suffix(stack)}.json"

    def pruned(self, stack: str, method: str, k: int) -> Path:
        return self.root / f"pruned-{k}{self._suffix(stack, method)}"

    def test_full(self) -> Path:
        return self.root / "test_full"

    def test_pruned(self, stack: str, method: str) -> Path:
        return self.root / f"test_pruned{self._suffix(stack, method)}"

    def finetune(self, stack: str, method: str) -> ExperimentDir:
        return ExperimentDir(self.root / f"finetune{self._suffix(stack, method)}")

    def test_healed(self, stack: str, method: str) -> Path:
        return self.root / f"test_healed{self._suffix(stack, method)}"

    def report(self, stack: str) -> Path:
        return self.root / f"measure_report{_stack_suffix(stack)}.json"

    def streamed_matrices(self, stack: str, measure_group: str = "streamed") -> Path:
        """The report stage's frame-sampled matrices (``streamed_T.npz``; PWCCA alone in ``pwcca_T.npz``)."""
        return self.dump / f"{measure_group}_T{_stack_suffix(stack)}.npz"

    def score_plot(self, stack: str) -> Path:
        return self.figure / f"score_vs_cer{_stack_suffix(stack)}.png"

    def healing_plot(self) -> Path:
        return self.figure / "healing_curve.png"

    def speed(self) -> Path:
        return self.test_pruned("encoder", "comflp") / "speed.json"

    @staticmethod
    def test_result(test_dir: Path) -> dict | None:
        """The report of a test dir, or None if that test has not run."""
        f = ExperimentDir(test_dir).test_report
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


# ---------------------------------------------------------------------------------------------
# names of the command lines' default outputs, logs and plots (the paper's where it has one)


def is_matrix_set(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ``.npz`` of several measures rather than one paper ``.npy`` matrix."""
    return Path(path).suffix == ".npz"


def matrix_set_files(dump_dir: str | os.PathLike) -> list[Path]:
    """The ``comflp measure`` files (:func:`measures_name`) under ``dump_dir``, sorted."""
    return sorted(Path(dump_dir).glob("measures_*.npz"))


def plot_of(path: str | os.PathLike) -> Path:
    """The figure that goes with a JSON or matrix output: same stem, ``.png``."""
    return Path(path).with_suffix(".png")


def log_of(path: str | os.PathLike) -> Path:
    """The log that goes with an output file: same stem, ``.log``."""
    return Path(path).with_suffix(".log")


def heatmap_file(figure_dir: str | os.PathLike, matrix_file: str | os.PathLike, measure: str | None = None) -> Path:
    """The heatmap of a saved matrix: ``<stem>.png`` for a paper ``.npy``, ``<stem>_<measure>.png`` for each
    measure of an ``.npz``."""
    stem = Path(matrix_file).stem
    return Path(figure_dir) / (f"{stem}_{measure}.png" if measure is not None and is_matrix_set(matrix_file)
                               else f"{stem}.png")


def measure_log(dump_dir: str | os.PathLike) -> Path:
    return Path(dump_dir) / "measure.log"


def search_output(exp_dir: str | os.PathLike, num_layers: int, num_clip: int, select_measure: str, mode: str) -> Path:
    """``comflp search``'s default strategy file."""
    return Path(exp_dir) / "search" / f"clip{num_layers}to{num_layers - num_clip}_{select_measure}_{mode}.json"


def test_output(exp_dir: str | os.PathLike, model: str | os.PathLike) -> Path:
    """``comflp test``'s default test dir, named after the model tested."""
    return Path(exp_dir) / f"test_{Path(model).name}"


def finetune_output(exp_dir: str | os.PathLike, num_layers: int, num_clip: int) -> Path:
    """``comflp finetune``'s default experiment dir."""
    return Path(exp_dir) / f"clip{num_layers}to{num_layers - num_clip}_ft"


def glp_output(exp_dir: str | os.PathLike, num_layers: int, num_clip: int) -> Path:
    """``comflp glp``'s default strategy file."""
    return Path(exp_dir) / "search" / f"clip{num_layers}to{num_layers - num_clip}_glp.json"


def report_output(exp_dir: str | os.PathLike, num_layers: int, num_clip: int) -> Path:
    """``comflp measure-report``'s default report (its plot and log sit beside it)."""
    return Path(exp_dir) / "report" / f"clip{num_layers}to{num_layers - num_clip}_measures.json"


def paper_search_log_name(num_layers: int, num_clip: int, select_measure: str, *, batch_size: int, iter_num: int,
                          search_mode: str, svcca_mode: str, thre: float) -> str:
    """The log file name the paper's ``search_then_verify.py`` writes for these flags."""
    stem = f"clip{num_layers}to{num_layers - num_clip}_search_then_verify"
    if select_measure == "svcca":
        return f"{stem}_SVCCA_thre{thre}_{batch_size * iter_num}{svcca_mode}_{search_mode}.log"
    if select_measure == "rand":
        return f"{stem}_RANDmix.log"
    if select_measure == "linspace":
        return f"{stem}_linspace.log"
    if select_measure == "dc":
        return f"{stem}_bs{batch_size}_iter{iter_num}_{search_mode}.log"
    return f"{stem}_{select_measure}_{search_mode}.log"


def glp_log_name(num_layers: int, num_clip: int) -> str:
    """The log file name of the paper's ``wer_based_greedy_search.py``."""
    return f"WER_greedy_clip{num_layers}to{num_layers - num_clip}.log"


# ---------------------------------------------------------------------------------------------
# the demo's own files: the corpus manifest and what a shipped demo model carries beside its weights


CORPUS_MANIFEST = "corpus.json"


def corpus_manifest(corpus_root: str | os.PathLike) -> Path:
    """The synthetic corpus' record of how it was made (config, voices, vocabulary), at its root."""
    return Path(corpus_root) / CORPUS_MANIFEST


class RecipeDir(ExperimentDir):
    """A demo model's training experiment (``exp/<model name>-train``): the experiment files plus its random
    start ``init-<L>l/`` and its ``processor/``."""

    @classmethod
    def of(cls, exp_dir: str | os.PathLike, model_name: str) -> "RecipeDir":
        """The default training dir of the shipped model ``model_name`` under ``exp_dir``."""
        return cls(Path(exp_dir) / f"{model_name}-train")

    def init(self, num_layers: int | None = None) -> Path:
        """The random start (``init-<L>l`` for a CTC model of L layers, ``init`` for the demo Whisper)."""
        return self.root / ("init" if num_layers is None else f"init-{num_layers}l")

    @property
    def processor(self) -> Path:
        return self.root / "processor"


class ShippedModelDir:
    """A shipped demo model: HF files plus ``results.json`` (its measured tables, recipe and training rows)
    and ``training_curve.png``, both written by its model card."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    @property
    def training_curve(self) -> Path:
        return self.root / "training_curve.png"

    @property
    def card(self) -> Path:
        return self.root / "README.md"  # the Hub shows a repository's README.md as its model card

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"  # transformers.utils.CONFIG_NAME

    def results(self) -> dict:
        """The recorded results, or ``{}`` for a model without them."""
        f = self.results_file
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
