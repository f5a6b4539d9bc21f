"""The CoMFLP method as typed stages: measure -> coarse -> fine, each timed.

The command lines, the model card and the benchmarks call these instead of
chaining the engines by hand:

>>> import numpy as np
>>> m = np.eye(5) + 0.5 * (1 - np.eye(5))  # a toy matrix of hidden states 0..4 (4 layers)
>>> [c.pruned for c in coarse(m, 2, top_n=3).candidates]
[[1, 2], [1, 3], [1, 4]]

:func:`comflp_search` runs all three: one measuring pass, the exact top-N of
the coarse search, and the fine search (full or racing) of those candidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data import Utterance
from .errors import ComflpError
from .hidden import MOMENT_MEMORY_GB, MeasureSettings, Statistics, collect
from .model import LoadedModel
from .search import SearchResult, search
from .strategy import Candidate
from .verify import RACE_CONFIDENCE, FineSearch, VerifyReport, race, verify

PAPER_DC = MeasureSettings(measures=("dc",), batch_size=4, iter_num=10)  # the paper's DC recipe


@dataclass(frozen=True)
class Measured:
    """Correlation matrices [L+1, L+1] (float64, by measure name), the statistics behind them, and the seconds."""

    matrices: dict[str, np.ndarray]
    stats: Statistics
    seconds: float


@dataclass(frozen=True)
class Coarse:
    """The coarse search's result (candidates best first) and its seconds."""

    result: SearchResult
    seconds: float

    @property
    def candidates(self) -> list[Candidate]:
        return self.result.candidates


@dataclass(frozen=True)
class Fine:
    """The fine search's report (CERs in candidate order, the best), its engine (for its statistics), the seconds."""

    report: VerifyReport
    engine: FineSearch = field(repr=False)
    seconds: float


@dataclass(frozen=True)
class SearchRun:
    """All three stages of one CoMFLP search."""

    measured: Measured
    coarse: Coarse
    fine: Fine

    @property
    def best(self) -> Candidate:
        return self.fine.report.best

    @property
    def seconds(self) -> float:
        return self.measured.seconds + self.coarse.seconds + self.fine.seconds


def measure(loaded: LoadedModel, utts: Sequence[Utterance], settings: MeasureSettings = PAPER_DC, *,
            accelerator=None, progress: bool = True, moment_memory_gb: float = MOMENT_MEMORY_GB) -> Measured:
    """Measure ``settings.measures`` on ``utts`` (:func:`comflp.hidden.collect`)."""
    start = time.perf_counter()
    matrices, stats = collect(loaded.model, loaded.feature_extractor, utts, settings, accelerator=accelerator,
                              progress=progress, moment_memory_gb=moment_memory_gb)
    return Measured({k: v.numpy() for k, v in matrices.items()}, stats, time.perf_counter() - start)


def coarse(matrix: np.ndarray, k: int, *, mode: str = "exact", top_n: int = 10, beam_size: int = 10,
           seed: int = 42) -> Coarse:
    """Score pruning strategies of ``k`` layers on ``matrix`` [L+1, L+1] alone (:func:`comflp.search.search`)."""
    start = time.perf_counter()
    result = search(matrix, k, mode, top_n=top_n, beam_size=beam_size, seed=seed)
    return Coarse(result, time.perf_counter() - start)


def fine(engine: FineSearch, candidates: Sequence[Candidate], *, racing: bool = False,
         confidence: float = RACE_CONFIDENCE, seed: int = 0) -> Fine:
    """The candidates' CERs on the engine's subset: all of it (:func:`verify`), or raced (:func:`race`)."""
    if not candidates:
        raise ComflpError("no candidate to verify")
    start = time.perf_counter()
    report = race(engine, candidates, confidence=confidence, seed=seed) if racing else verify(engine, candidates)
    return Fine(report, engine, time.perf_counter() - start)


def comflp_search(loaded: LoadedModel, measure_utts: Sequence[Utterance], engine: FineSearch, k: int, *,
                  settings: MeasureSettings = PAPER_DC, measure_name: str | None = None, top_n: int = 10,
                  racing: bool = False, seed: int = 0, progress: bool = False) -> SearchRun:
    """Measure, take the exact top-``top_n`` strategies of ``k`` layers, and fine-search them on ``engine``.

    ``measure_name``: which of the measured matrices scores the strategies (default: the first of
    ``settings.measures``).
    """
    measured = measure(loaded, measure_utts, settings, progress=progress)
    name = measure_name or settings.measures[0]
    if name not in measured.matrices:
        raise ComflpError(f"{name} was not measured (measured: {', '.join(measured.matrices)})")
    found = coarse(measured.matrices[name], k, top_n=top_n)
    return SearchRun(measured, found, fine(engine, found.candidates, racing=racing, seed=seed))
