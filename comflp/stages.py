"""The CoMFLP method as typed stages: measure -> coarse -> fine, each timed.

The command lines, the model card and the benchmarks call these instead of
chaining the engines by hand:

>>> import numpy as np
>>> m = np.eye(5) + 0.5 * (1 - np.eye(5))  # a toy matrix of hidden states 0..4 (4 layers)
>>> [c.pruned for c in coarse(m, 2, top_n=3).candidates]
[[1, 2], [1, 3], [1, 4]]

:func:`comflp_search` runs all three: one measuring pass, the exact top-N of
the coarse search, and the fine search (full or racing) of those candidates.
:func:`glp` is the baseline search by the task metric, :func:`prune` saves a
pruned model (and its MMS adapter files) for plain transformers, and
:func:`score` decodes a test set.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import Utterance
from .decode import Transcription, transcribe
from .errors import ComflpError
from .hidden import MOMENT_MEMORY_GB, MeasureSettings, Statistics, collect
from .metrics import ErrorRate, Unit, guess_unit
from .model import (LoadedModel, adapter_files, base_model, count_parameters, is_encoder_decoder, num_layers,
                    prune as prune_model, prune_layer_weights, save_model)
from .search import SearchResult, search
from .strategy import Candidate, validate
from .verify import RACE_CONFIDENCE, FineSearch, GLPResult, VerifyReport, greedy_layer_pruning, race, verify

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


def fine(engine: FineSearch, candidates: Sequence[Candidate], *, racing: bool = True,
         confidence: float = RACE_CONFIDENCE, seed: int = 0) -> Fine:
    """The candidates' CERs on the engine's subset: all of it (:func:`verify`), or raced (:func:`race`)."""
    if not candidates:
        raise ComflpError("no candidate to verify")
    start = time.perf_counter()
    report = race(engine, candidates, confidence=confidence, seed=seed) if racing else verify(engine, candidates)
    return Fine(report, engine, time.perf_counter() - start)


def comflp_search(loaded: LoadedModel, measure_utts: Sequence[Utterance], engine: FineSearch, k: int, *,
                  settings: MeasureSettings = PAPER_DC, measure_name: str | None = None, top_n: int = 10,
                  racing: bool = True, seed: int = 0, progress: bool = False) -> SearchRun:
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


def glp(engine: FineSearch, k: int, *, progress: bool = False, max_seconds: float | None = None) -> GLPResult:
    """Greedy layer pruning by the engine's error rate, K steps (:func:`comflp.verify.greedy_layer_pruning`)."""
    return greedy_layer_pruning(engine, k, progress=progress, max_seconds=max_seconds)


@dataclass(frozen=True)
class Pruned:
    """A pruned model saved in HF format: its dir, the 1-based layers removed, the adapter files pruned with it.

    For an encoder-decoder model ``removed``/``num_layers`` are the encoder's and the decoder has its own.
    """

    path: Path
    removed: list[int]
    num_layers: int
    adapter_files: list[str]
    decoder_removed: list[int] = field(default_factory=list)
    decoder_layers: int | None = None


def prune(loaded: LoadedModel, layers: Sequence[int], output: str | os.PathLike, *,
          decoder_layers: Sequence[int] = (), fp16: bool = False, overwrite: bool = False) -> Pruned:
    """Save ``loaded`` without the 1-based ``layers`` to ``output`` (config, safetensors, processor files).

    ``decoder_layers``: for an encoder-decoder model (Whisper), the decoder layers to remove too (either
    list may then be empty; :func:`comflp.model.prune` renumbers the cache indices and alignment heads).

    Every MMS ``adapter.<lang>.safetensors`` beside a local source loses the adapters of the removed layers
    too. A source without a CTC head is saved without one (never a randomly initialised head). ``output``
    must be new, empty, or (with ``overwrite``) an earlier comflp output.
    """
    from safetensors.torch import load_file

    total = num_layers(loaded.model)
    layers = validate(list(layers), total) if layers else []
    decoder = validate(list(decoder_layers), num_layers(loaded.model, "decoder")) if decoder_layers else []
    pruned = prune_model(loaded.model, layers, decoder_pruned=decoder)
    if not loaded.has_ctc_head:
        pruned = base_model(pruned)
    kept = [i for i in range(total) if i + 1 not in set(layers)]
    adapters = {}
    for f in adapter_files(loaded.source):
        try:
            weights = load_file(str(f))
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ComflpError(f"cannot read adapter file {f}: {str(err).splitlines()[0]}") from None
        adapters[f.name] = prune_layer_weights(weights, loaded.model, kept)
    path = save_model(pruned, output, feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer,
                      dtype=torch.float16 if fp16 else None, overwrite=overwrite, extra_weights=adapters)
    return Pruned(Path(path), list(layers), num_layers(pruned), sorted(adapters), decoder,
                  num_layers(pruned, "decoder") if is_encoder_decoder(pruned) else None)


@dataclass(frozen=True)
class Scored:
    """A model's error rate on a test set, with the transcripts, the real-time factor and the model's size."""

    error_rate: ErrorRate
    unit: Unit
    transcription: Transcription
    num_parameters: int
    num_layers: int

    @property
    def rtf(self) -> float:
        """Decoding seconds per audio second."""
        return self.transcription.decode_seconds / self.transcription.audio_seconds


def score(loaded: LoadedModel, utts: Sequence[Utterance], *, batch_size: int = 16, unit: Unit | None = None,
          device: str | torch.device = "cpu", progress: bool = False, pad_audio: bool = False) -> Scored:
    """Greedy-decode ``utts`` (batch-invariant) and score them: CER for characters, WER for words (``unit``
    guessed from the references when None)."""
    if loaded.tokenizer is None:
        raise ComflpError(f"{loaded.source} has no tokenizer: decoding needs one")
    result = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=batch_size,
                        device=device, progress=progress, pad_audio=pad_audio)
    unit = unit or guess_unit([u.text or "" for u in utts])
    return Scored(result.score(unit), unit, result, count_parameters(loaded.model), num_layers(loaded.model))
