"""Transcribe a corpus with a CTC model and score it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from .data import Utterance, frame_mask, iter_batches
from .metrics import ErrorRate, Unit, error_rate, greedy_decode, guess_unit


@dataclass
class Transcription:
    """Hypotheses in the order of the input utterances, plus timing."""

    utt_ids: list[str]
    references: list[str | None]
    hypotheses: list[str]
    audio_seconds: float
    decode_seconds: float

    def score(self, unit: Unit | None = None) -> ErrorRate:
        refs = [r or "" for r in self.references]
        return error_rate(refs, self.hypotheses, unit=unit or guess_unit(refs))


@torch.inference_mode()
def transcribe(model, feature_extractor, tokenizer, utts: Sequence[Utterance], *, batch_size: int = 16,
               device: str | torch.device = "cpu", progress: bool = False, desc: str = "decoding") -> Transcription:
    """Greedy-decode ``utts`` in length-sorted batches; results come back in input order."""
    hyps: dict[str, str] = {}
    audio = 0.0
    elapsed = 0.0
    sr = int(feature_extractor.sampling_rate)
    batches = iter_batches(utts, feature_extractor, batch_size=batch_size)
    total = (len(utts) + batch_size - 1) // batch_size
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, unit="batch"):
        batch = batch.to(device)
        start = time.perf_counter()
        logits = model(batch.input_values, attention_mask=batch.attention_mask).logits
        mask = frame_mask(model, batch.attention_mask, logits.shape[1])
        texts = greedy_decode(logits, tokenizer, mask.sum(-1))
        elapsed += time.perf_counter() - start
        audio += float(batch.lengths.sum()) / sr
        hyps.update(zip(batch.utt_ids, texts))
    return Transcription([u.utt_id for u in utts], [u.text for u in utts], [hyps[u.utt_id] for u in utts],
                         audio, elapsed)
