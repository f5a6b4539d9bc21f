"""The demo's own files and folder layouts, known here only: a ``comflp demo`` run (:class:`DemoDir`), a demo
model's training dir (:class:`RecipeDir`), what a shipped demo model carries beside its weights
(:class:`ShippedModelDir`) and the synthetic corpus' manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..artifacts import ExperimentDir, stack_suffix

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
        return self.root / f"{'search' if method == 'comflp' else method}{stack_suffix(stack)}.json"

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
        return self.root / f"measure_report{stack_suffix(stack)}.json"

    def streamed_matrices(self, stack: str, measure_group: str = "streamed") -> Path:
        """The report stage's frame-sampled matrices (``streamed_T.npz``; PWCCA alone in ``pwcca_T.npz``)."""
        return self.dump / f"{measure_group}_T{stack_suffix(stack)}.npz"

    def score_plot(self, stack: str) -> Path:
        return self.figure / f"score_vs_cer{stack_suffix(stack)}.png"

    def healing_plot(self) -> Path:
        return self.figure / "healing_curve.png"

    def speed(self) -> Path:
        return self.test_pruned("encoder", "comflp") / "speed.json"

    @staticmethod
    def test_result(test_dir: Path) -> dict | None:
        """The report of a test dir, or None if that test has not run."""
        f = ExperimentDir(test_dir).test_report
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None



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
