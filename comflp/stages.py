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

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import Utterance
from .decode import Transcription, transcribe
from .errors import ComflpError
from .finetune import FinetuneConfig
from .artifacts import REPAIR_FILE, WRITTEN_BY, ExperimentDir, is_matrix_set, matrix_meta, save_matrices, save_matrix
from .hidden import MOMENT_MEMORY_GB, MeasureSettings, Statistics, collect
from .metrics import ErrorRate, Unit, guess_unit, rate_name, unusable_note
from .heads import check_prompt
from .prompt import Prompt
from .model import (LoadedModel, adapter_files, base_model, count_parameters, family_of, fingerprint,
                    num_layers, prune as prune_model, prune_layer_weights, save_model)
from .repair import DEFAULT_RIDGE, Repair
from .report import MeasureReport
from .search import Coarse, coarse  # the coarse stage lives with the search: no transformers import
from .strategy import Candidate, validate
from .verify import RACE_CONFIDENCE, FineSearch, GLPResult, VerifyReport, greedy_layer_pruning, race, verify

log = logging.getLogger("comflp.stages")

PAPER_DC = MeasureSettings(measures=("dc",), batch_size=4, iter_num=10)  # the paper's DC recipe


@dataclass(frozen=True)
class Measured:
    """Correlation matrices [L+1, L+1] (float64, by measure name) of one layer stack of a model, the
    statistics behind them, the settings, and the seconds."""

    matrices: dict[str, np.ndarray]
    stats: Statistics
    seconds: float
    stack: str = "encoder"
    num_layers: int = 0
    settings: MeasureSettings = field(default_factory=lambda: PAPER_DC)
    model: str = ""
    data: str = ""
    fingerprint: str | None = None  # of the model measured (comflp.model.fingerprint)
    record: dict = field(default_factory=dict)  # more to record beside the matrices (a command's settings)

    def meta(self) -> dict:
        """What a matrix file records (:func:`comflp.artifacts.matrix_meta`, then :attr:`record`)."""
        return {**matrix_meta(model=self.model, data=self.data, num_layers=self.num_layers, stack=self.stack,
                              settings=self.settings.to_dict(), num_utterances=self.stats.num_utterances,
                              num_frames=self.stats.num_frames, num_batches=self.stats.num_batches,
                              seconds=self.seconds, fingerprint=self.fingerprint), **self.record}

    def save(self, path: str | os.PathLike, measure: str | None = None, *, overwrite: bool = False) -> Path:
        """One matrix (default: the first measured) as the paper's ``.npy`` + sidecar, or all of them to an
        ``.npz`` when ``path`` ends so; ``overwrite`` replaces only an earlier comflp output."""
        if is_matrix_set(path):
            return save_matrices(path, self.matrices, self.meta(), overwrite=overwrite)
        return save_matrix(path, self.matrices[measure or next(iter(self.matrices))], self.meta(), overwrite=overwrite)


@dataclass(frozen=True)
class Fine:
    """The fine search's report (CERs in candidate order, the best), its engine (for its statistics), the seconds."""

    report: VerifyReport
    engine: FineSearch = field(repr=False)
    seconds: float
    racing: bool = False
    confidence: float = RACE_CONFIDENCE  # the race's, when ``racing``

    def _order(self) -> list[int]:
        full = len(self.engine.utts)
        return sorted(range(len(self.report.candidates)),
                      key=lambda i: (self.report.decoded[i] < full, self.report.candidates[i].cer, i))

    @property
    def ranked(self) -> list[Candidate]:
        """The candidates best first: a race's survivors (error rates on the whole subset) before the dropped."""
        return [self.report.candidates[i] for i in self._order()]

    @property
    def ranked_decoded(self) -> list[int]:
        """Utterances decoded per candidate, in :attr:`ranked` order."""
        return [self.report.decoded[i] for i in self._order()]

    def meta(self, *, data: str, model: str) -> dict:
        """What a strategy file records of the fine search (``data``: the subset's source, ``model``: the
        model's): the error rate's name, the utterances each candidate was decoded on, the race, the
        correlation, the work, the detected languages and, when every candidate is broken, a note saying so."""
        engine = self.engine
        meta = {"error_rate": rate_name(engine.unit), "decoded_utterances": self.ranked_decoded,
                "race": self.racing, "race_confidence": self.confidence if self.racing else None, "pearson": self.report.pearson,
                "fine_seconds": self.seconds, "verify_data_dir": data, "verify_utterances": len(engine.utts),
                "layer_applications": engine.stats.layer_applications,
                "naive_layer_applications": engine.stats.naive_layer_applications, "model": model,
                **engine_languages(engine)}
        unusable = unusable_note([c.cer for c in self.report.candidates], what="candidate")
        return {**meta, "unusable": unusable} if unusable else meta


def engine_languages(engine: FineSearch) -> dict:
    """``{"languages": {token: count}}``: the prompt languages the full model detected (a multilingual model
    whose prompt forces none), for a strategy file; empty when none were detected."""
    if not engine.languages:
        return {}
    return {"languages": dict(Counter(engine.languages.values()).most_common())}


def glp_meta(result: GLPResult, engine: FineSearch, *, data: str, model: str) -> dict:
    """What a GLP strategy file records: every step, the seconds and evaluations, the subset, the model, the
    detected languages, and a note when the last step is broken."""
    meta = {"search_mode": "glp", "path": [c.to_dict() for c in result.path], "seconds": result.seconds,
            "evaluations": result.evaluations, "verify_data_dir": data, "verify_utterances": len(engine.utts),
            "model": model, "error_rate": rate_name(engine.unit), **engine_languages(engine)}
    unusable = unusable_note([result.path[-1].cer], what="step of greedy pruning, to its last,")
    return {**meta, "unusable": unusable} if unusable else meta


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
            stack: str = "encoder", data: str = "", accelerator=None, progress: bool = True,
            moment_memory_gb: float = MOMENT_MEMORY_GB, prompt: Prompt | None = None) -> Measured:
    """Measure ``settings.measures`` of the ``stack`` layers on ``utts`` (:func:`comflp.hidden.collect`; a
    decoder is measured under teacher forcing on the transcripts). ``data`` names the utterances' source in
    the saved matrix's record."""
    start = time.perf_counter()
    matrices, stats = collect(loaded.model, loaded.feature_extractor, utts, settings, accelerator=accelerator,
                              progress=progress, moment_memory_gb=moment_memory_gb, stack=stack,
                              tokenizer=loaded.tokenizer, prompt=prompt)
    return Measured({k: v.numpy() for k, v in matrices.items()}, stats, time.perf_counter() - start, stack,
                    num_layers(loaded.model, stack), settings, str(loaded.source), data, fingerprint(loaded.model))


def fine(engine: FineSearch, candidates: Sequence[Candidate], *, racing: bool = True,
         confidence: float = RACE_CONFIDENCE, seed: int = 0) -> Fine:
    """The candidates' CERs on the engine's subset: all of it (:func:`verify`), or raced (:func:`race`)."""
    if not candidates:
        raise ComflpError("no candidate to verify")
    start = time.perf_counter()
    report = race(engine, candidates, confidence=confidence, seed=seed) if racing else verify(engine, candidates)
    return Fine(report, engine, time.perf_counter() - start, racing, confidence)


def comflp_search(loaded: LoadedModel, measure_utts: Sequence[Utterance], engine: FineSearch, k: int, *,
                  settings: MeasureSettings = PAPER_DC, measure_name: str | None = None, top_n: int = 10,
                  racing: bool = True, seed: int = 0, progress: bool = False) -> SearchRun:
    """Measure, take the exact top-``top_n`` strategies of ``k`` layers, and fine-search them on ``engine``.

    ``measure_name``: which of the measured matrices scores the strategies (default: the first of
    ``settings.measures``).
    """
    measured = measure(loaded, measure_utts, settings, stack=engine.stack, progress=progress)
    name = measure_name or settings.measures[0]
    if name not in measured.matrices:
        raise ComflpError(f"{name} was not measured (measured: {', '.join(measured.matrices)})")
    from .model.layers import expressible

    found = coarse(measured.matrices[name], k, top_n=top_n, allowed=expressible(loaded.model, engine.stack))
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
    repair: Repair | None = None  # folded into the saved weights


def repair(loaded: LoadedModel, utts: Sequence[Utterance], *, layers: Sequence[int] = (),
           decoder_layers: Sequence[int] = (), candidates: Sequence[Sequence[int]] = (), stack: str = "encoder",
           kind: str = "affine", ridge: float = DEFAULT_RIDGE, batch_size: int = 8, data: str = "",
           prompt: Prompt | None = None, pad_audio: bool = False, progress: bool = False) -> Repair:
    """Fit the repair of removing the 1-based ``layers`` (and ``decoder_layers`` of an encoder-decoder model)
    on the calibration utterances ``utts``: one pass of the full model, one least-squares map per cut
    (:func:`comflp.repair.fit_repair`); :func:`prune` folds it into the saved weights.

    ``candidates``: pruned sets of ``stack`` whose cuts are fitted too, each once (a fine search that ranks
    candidates after repair: ``FineSearch.repair``). ``kind``: ``affine`` (every family) or ``linear``
    (pre-LN layers only); ``data`` names the calibration set in the record; ``Repair.seconds`` times it.
    """
    from .repair import fit_repair

    return fit_repair(loaded, utts, layers=layers, decoder_layers=decoder_layers, candidates=candidates, stack=stack,
                      kind=kind, ridge=ridge, batch_size=batch_size, data=data, prompt=prompt, pad_audio=pad_audio,
                      progress=progress)


def prune(loaded: LoadedModel, layers: Sequence[int], output: str | os.PathLike, *,
          decoder_layers: Sequence[int] = (), fp16: bool = False, overwrite: bool = False,
          repair: Repair | None = None, strategy: dict | None = None, command: str | None = None) -> Pruned:
    """Save ``loaded`` without the 1-based ``layers`` to ``output`` (config, safetensors, processor files).

    ``decoder_layers``: for an encoder-decoder model (Whisper), the decoder layers to remove too (either
    list may then be empty; :func:`comflp.model.prune` renumbers the cache indices and alignment heads).

    Every MMS ``adapter.<lang>.safetensors`` beside a local source loses the adapters of the removed layers
    too. A source without a CTC head is saved without one (never a randomly initialised head). ``output``
    must be new, empty, or (with ``overwrite``) an earlier comflp output.

    ``repair`` (from :func:`repair`, for the same layers): its maps are folded into the kept weights, and the
    dir records it (``artifacts.REPAIR_FILE``); the checkpoint stays a plain one.

    The dir gets a model card (:mod:`comflp.modelcard`): the layers removed, ``strategy`` (where they came
    from: ``file``, ``rank``, ``score``, ``measure``...), the repair, the parameter counts and ``command``
    (the command line that made it).
    """
    from safetensors.torch import load_file

    from .modelcard import card_files, pruning_record

    total = num_layers(loaded.model)
    layers = validate(list(layers), total) if layers else []
    decoder = validate(list(decoder_layers), num_layers(loaded.model, "decoder")) if decoder_layers else []
    pruned = prune_model(loaded.model, layers, decoder_pruned=decoder)
    if repair is not None:
        from .repair import fold_into_pruned

        fold_into_pruned(pruned, loaded.model, repair, {"encoder": layers, "decoder": decoder})
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
    records = {REPAIR_FILE: {"written_by": WRITTEN_BY, **repair.record()}} if repair is not None else {}
    card = pruning_record(loaded.source, loaded.model if loaded.has_ctc_head else base_model(loaded.model), pruned,
                          {"encoder": layers, "decoder": decoder}, strategy=strategy, command=command,
                          repair=repair.record() if repair else None)
    path = save_model(pruned, output, feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer,
                      dtype=torch.float16 if fp16 else None, overwrite=overwrite, extra_weights=adapters,
                      extra_json=records, extra_text=card_files(card, model_dir=output))
    return Pruned(Path(path), list(layers), num_layers(pruned), sorted(adapters), decoder,
                  num_layers(pruned, "decoder") if "decoder" in family_of(pruned).stacks else None, repair)



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
          device: str | torch.device = "cpu", progress: bool = False, pad_audio: bool = False,
          prompt: Prompt | None = None) -> Scored:
    """Greedy-decode ``utts`` (batch-invariant) and score them: CER for characters, WER for words (``unit``
    guessed from the references when None)."""
    if loaded.tokenizer is None:
        raise ComflpError(f"{loaded.source} has no tokenizer: decoding needs one")
    result = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=batch_size,
                        device=device, progress=progress, pad_audio=pad_audio,
                        prompt=check_prompt(loaded.model, prompt))
    unit = unit or guess_unit([u.text or "" for u in utts])
    return Scored(result.score(unit), unit, result, count_parameters(loaded.model), num_layers(loaded.model))


@dataclass(frozen=True)
class Tested:
    """A test run: the scores, the report written (``test_asr.json``, beside ``hyp.txt``) and its contents."""

    scored: Scored
    report: Path
    summary: dict


def evaluate(loaded: LoadedModel, utts: Sequence[Utterance], output_dir: str | os.PathLike, *, data: str,
             batch_size: int = 16, unit: Unit | None = None, device: str | torch.device = "cpu", progress: bool = False,
             pad_audio: bool = False, overwrite: bool = False, prompt: Prompt | None = None) -> Tested:
    """:func:`score` ``utts`` and write the test report and the hypotheses under ``output_dir``.

    ``data`` names the test set in the report. The report is refused if comflp did not write it, and replaced
    only with ``overwrite``; the dir is locked while decoding. A model comflp wrote gets the result in its
    model card (:func:`comflp.modelcard.add_test`).
    """
    import platform

    from . import atomic
    from .artifacts import claim_file, open_output_dir, output_lock

    out = ExperimentDir(open_output_dir(output_dir, kind="test"))
    report = claim_file(out.test_report, overwrite=overwrite, flag="test report")
    with output_lock(report):
        scored = score(loaded, utts, batch_size=batch_size, unit=unit, device=device, progress=progress,
                       pad_audio=pad_audio, prompt=prompt)
        er, result = scored.error_rate, scored.transcription
        summary = {
            "model": str(loaded.source), "data_dir": data, "num_utterances": len(utts), "unit": scored.unit,
            "error_rate": er.rate, "substitutions": er.substitutions, "deletions": er.deletions,
            "insertions": er.insertions, "num_ref_tokens": er.num_ref_tokens,
            "audio_seconds": result.audio_seconds, "decode_seconds": result.decode_seconds, "rtf": scored.rtf,
            "num_parameters": scored.num_parameters, "num_layers": scored.num_layers, "device": str(device),
            "batch_size": batch_size, "pad_audio": pad_audio,
            **({"prompt": prompt.to_dict()} if prompt is not None and (prompt.language or prompt.task or prompt.instruction) else {}),
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        }
        if "decoder" in family_of(loaded.model).stacks:
            summary["decoder_layers"] = num_layers(loaded.model, "decoder")
        for utt, ref, hyp in zip(result.utt_ids, result.references, result.hypotheses):
            logging.getLogger("comflp.test.hyp").debug("%s ref=%s hyp=%s", utt, ref, hyp)
        atomic.write_json(report, summary)
        atomic.write_text(out.hypotheses, "".join(f"{u} {h}\n" for u, h in zip(result.utt_ids, result.hypotheses)))
    if Path(loaded.source).is_dir():  # a model comflp wrote has a card: the result goes into it
        from .modelcard import add_test

        add_test(loaded.source, {"data": data, "unit": scored.unit, "error_rate": er.rate, "num_utterances": len(utts),
                                 "rtf": scored.rtf, "report": str(Path(report).resolve())})
    log.info("%s %.2f%% on %d utterances (%s); RTF %.4f; %d layers, %s parameters",
             rate_name(scored.unit), 100 * er.rate, len(utts), data, scored.rtf,
             scored.num_layers, f"{scored.num_parameters:,}")
    return Tested(scored, report, summary)


def finetune(config: FinetuneConfig) -> ExperimentDir:
    """Fine-tune ("heal") ``config.model`` pruned as ``config`` says, into the experiment dir
    ``config.output_dir``.

    ``config``: a :class:`comflp.finetune.FinetuneConfig` (its fields are the flags of ``comflp finetune``:
    ``strategy``/``rank``, ``layers`` or ``whole_model``; ``distill``, ``epochs``, ``lr``...), checked by its
    ``validate``. An interrupted run of the same settings resumes from its ``last/``; another experiment in
    the output dir is refused. Returns the experiment dir (``epoch<N>/``, ``final/``, ``metrics.jsonl``).
    """
    from .finetune import train

    return ExperimentDir(train(config))


def average(exp: ExperimentDir, *, num: int, mode: str = "valid", overwrite: bool = False) -> Path:
    """Average ``num`` epoch checkpoints of ``exp`` (``valid``: the best by validation CER; ``last``: the
    newest) into its ``model_avg/``; returns that dir."""
    from .average import average as average_checkpoints, select_epochs

    saved = exp.saved_epochs()
    if not saved:
        raise ComflpError(f"no epoch<N>/ checkpoints in {exp.root}")
    epochs = select_epochs(exp, last_epoch=saved[-1], num=min(num, len(saved)), mode=mode)
    return average_checkpoints(exp, epochs, overwrite=overwrite)


def measure_report(engine: FineSearch, matrices: dict[str, np.ndarray], k: int, *, num_strategies: int = 40,
                   seed: int = 0, bootstrap: int = 1000, settings: dict | None = None,
                   output: str | os.PathLike | None = None, overwrite: bool = False) -> MeasureReport:
    """Which measure predicts the error rate: decode ``num_strategies`` strategies of ``k`` layers (every
    measure's top 3, then seeded random ones) on ``engine``'s subset and rank-correlate each matrix's score
    with their error rates (:func:`comflp.report.build_report`).

    ``matrices``: label -> [L+1, L+1] of the engine's stack. With ``output``, the report JSON and a PNG of
    one scatter plot per measure (beside it) are written. Returns the :class:`comflp.report.MeasureReport`.
    """
    from . import atomic
    from .artifacts import WRITTEN_BY, claim_file, output_lock, plot_of
    from .plots import scatter_grid
    from .report import build_report, sample_strategies

    out = png = None
    if output is not None:
        out = claim_file(output, overwrite=overwrite)
        png = claim_file(plot_of(output), overwrite=overwrite)
    strategies = sample_strategies(matrices, k, num_strategies, seed=seed)
    start = time.perf_counter()
    cers = [r.rate for r in engine.evaluate(strategies)]
    depth = next(iter(matrices.values())).shape[0] - 1
    settings = {**(settings or {}), "model": str(engine.loaded.source), "stack": engine.stack, "num_layers": depth,
                "num_clip_layers": k, "num_strategies": len(strategies), "seed": seed, "bootstrap": bootstrap,
                "verify_utterances": len(engine.utts), "fine_search_seconds": round(time.perf_counter() - start, 2)}
    report = build_report(matrices, strategies, cers, num_resamples=bootstrap, seed=seed, settings=settings)
    if out is not None:
        with output_lock(out):
            atomic.write_json(out, {"written_by": WRITTEN_BY, **report.to_dict()})
            scatter_grid({name: ([s.scores[name] for s in report.strategies], [100 * s.cer for s in report.strategies])
                          for name in report.measures}, png, xlabel="score (search objective)",
                         ylabel="CER on the subset (%)",
                         titles={n: f"{n}: rho {m.spearman:+.2f}" for n, m in report.measures.items()})
    log.info("%d strategies of %d -> %d %s layers on %d utterances\n%s", len(strategies), depth, depth - k,
             engine.stack, len(engine.utts), report.table())
    return report
