"""Transcribe a corpus with any head kind (:mod:`comflp.heads`: best-path CTC, greedy generation) and score it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .data import Utterance, iter_batches, num_samples
from .errors import ComflpError
from .heads import decode_batch, head_of
from .metrics import ErrorRate, Unit, error_rate, guess_unit
from .model import min_audio_samples
from .prompt import Prompt

log = logging.getLogger(__name__)


@dataclass
class Transcription:
    """Hypotheses in the order of the input utterances, plus timing."""

    utt_ids: list[str]
    references: list[str | None]
    hypotheses: list[str]
    audio_seconds: float
    decode_seconds: float
    normalizer: Callable[[str], str] | None = None  # text in words is scored through it (generated text)

    def score(self, unit: Unit | None = None) -> ErrorRate:
        refs = [r or "" for r in self.references]
        unit = unit or guess_unit(refs)
        hyps = self.hypotheses
        if self.normalizer is not None and unit == "word":
            refs, hyps = [self.normalizer(r) for r in refs], [self.normalizer(h) for h in hyps]
        return error_rate(refs, hyps, unit=unit)


def text_language(model, tokenizer, prompt: Prompt | None = None) -> str | None:
    """The language ``model`` writes, where it is known before any audio is heard: ``"en"`` or ``"zh"``, else
    None (:meth:`comflp.heads.HeadKind.text_language`: a prompt's language, or the vocabulary's script)."""
    return head_of(model).text_language(model, tokenizer, prompt)


def check_decodable(model, feature_extractor, utts: Sequence[Utterance]) -> None:
    """One line naming the utterances too short to give the model a single frame (they cannot be decoded)."""
    sampling_rate = int(feature_extractor.sampling_rate)
    least = min_audio_samples(model, feature_extractor)
    short = [u.utt_id for u in utts if num_samples(u, sampling_rate) < least]
    if short:
        raise ComflpError(f"{len(short)} utterance(s) are shorter than the model's receptive field "
                          f"({1000 * least / sampling_rate:.0f} ms) and cannot be decoded: "
                          f"{', '.join(short[:3])}{', ...' if len(short) > 3 else ''}; remove them from the corpus")


@torch.inference_mode()
def transcribe(model, feature_extractor, tokenizer, utts: Sequence[Utterance], *, batch_size: int = 16,
               device: str | torch.device = "cpu", progress: bool = False, desc: str = "decoding",
               pad_audio: bool = False, prompt: Prompt | None = None) -> Transcription:
    """Greedy-decode ``utts`` in length-sorted batches; results come back in input order.

    The transcripts do not depend on ``batch_size`` unless ``pad_audio`` (the paper's batching). ``prompt``:
    an encoder-decoder model's language and task (:mod:`comflp.prompt`).
    """
    hyps: dict[str, str] = {}
    audio = 0.0
    elapsed = 0.0
    sr = int(feature_extractor.sampling_rate)
    check_decodable(model, feature_extractor, utts)
    head = head_of(model)
    if all(u.text is not None for u in utts):
        head.check_references([u.text for u in utts], tokenizer, what="references")
    # one cap for every generation comflp runs (test, validation, fine search): from the references when
    # there are any, so a broken model cannot babble to the decoder's limit on some commands only
    references = [u.text for u in utts] if all(u.text for u in utts) else None
    limit = head.generation_limit(model, tokenizer, references)
    batches = iter_batches(utts, feature_extractor, batch_size=batch_size)
    total = (len(utts) + batch_size - 1) // batch_size
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
        batch = batch.to(device)
        start = time.perf_counter()
        texts = decode_batch(model, tokenizer, batch, pad_audio=pad_audio, prompt=prompt, max_new_tokens=limit)
        elapsed += time.perf_counter() - start
        audio += float(batch.lengths.sum()) / sr
        hyps.update(zip(batch.utt_ids, texts))
    return Transcription([u.utt_id for u in utts], [u.text for u in utts], [hyps[u.utt_id] for u in utts],
                         audio, elapsed, normalizer=head.normalizer(model, tokenizer, prompt))


@dataclass(frozen=True)
class SpeedComparison:
    """Decoding speed of two models on the same batches, measured as a pair after warm-up."""

    audio_seconds: float
    first_seconds: float  # best pass of the first model
    second_seconds: float

    @property
    def speedup(self) -> float:
        """How many times faster the second model decodes than the first."""
        return self.first_seconds / self.second_seconds


@torch.inference_mode()
def compare_speed(first, second, feature_extractor, tokenizer, utts: Sequence[Utterance], *, batch_size: int = 16,
                  repeats: int = 3, device: str | torch.device = "cpu") -> SpeedComparison:
    """Time greedy decoding of ``utts`` by two models side by side.

    Audio is loaded once, before timing; each model decodes one batch to warm
    up, then the two alternate for ``repeats`` full passes and the best pass of
    each counts, so neither pays the warm-up nor gets a quieter machine.
    """
    batches = [b.to(device) for b in iter_batches(utts, feature_extractor, batch_size=batch_size)]
    audio = sum(float(b.lengths.sum()) for b in batches) / int(feature_extractor.sampling_rate)
    for model in (first, second):
        decode_batch(model, tokenizer, batches[0])
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, model in enumerate((first, second)):
            start = time.perf_counter()
            for b in batches:
                decode_batch(model, tokenizer, b)
            best[i] = min(best[i], time.perf_counter() - start)
    return SpeedComparison(audio, best[0], best[1])
