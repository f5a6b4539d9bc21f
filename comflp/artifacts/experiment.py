"""The experiment dir of fine-tuning, averaging and testing, the names of the files comflp writes into and beside
models, and the command lines' default outputs, logs and plots (the paper's where it has one)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import atomic
from ..errors import ComflpError
from .ownership import WRITTEN_BY, open_output_dir

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
