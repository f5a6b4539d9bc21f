"""Greedy CTC decoding, error rates and real-time factor.

Mandarin is scored per character (CER): spaces are removed and every
character is a token. The paper scored space-joined characters with a WER
metric, which is the same number. Other languages are scored per word (WER).
Error rates come from jiwer over the whole set (total edits / total
reference tokens), not averaged per utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import jiwer
import numpy as np
import torch

Unit = Literal["char", "word"]


def normalize(text: str, unit: Unit) -> str:
    """Reference/hypothesis text in the form scored: chars space-joined, or words single-spaced."""
    if unit == "char":
        return " ".join(ch for ch in text if not ch.isspace())
    return " ".join(text.split())


@dataclass(frozen=True)
class ErrorRate:
    """Edit counts over a whole set; ``rate`` = (S + D + I) / N."""

    rate: float
    substitutions: int
    deletions: int
    insertions: int
    num_ref_tokens: int
    unit: str


def error_rate(references: Sequence[str], hypotheses: Sequence[str], *, unit: Unit = "char") -> ErrorRate:
    """CER (unit='char') or WER (unit='word') of ``hypotheses`` against ``references`` via jiwer."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r, unit) for r in references]
    hyps = [normalize(h, unit) for h in hypotheses]
    if not any(refs):
        raise ValueError("all references are empty")
    out = jiwer.process_words(refs, hyps)
    n = out.substitutions + out.deletions + out.hits
    return ErrorRate((out.substitutions + out.deletions + out.insertions) / n,
                     out.substitutions, out.deletions, out.insertions, n, unit)


def utterance_errors(references: Sequence[str], hypotheses: Sequence[str], *,
                     unit: Unit = "char") -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance edit counts and reference lengths, in the units of :func:`error_rate`.

    Returns ``errors`` [N] (S + D + I of each utterance) and ``tokens`` [N]
    (reference tokens), so ``errors.sum() / tokens.sum()`` equals
    ``error_rate(references, hypotheses, unit=unit).rate``.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize(r, unit) for r in references]
    hyps = [normalize(h, unit) for h in hypotheses]
    out = jiwer.process_words(refs, hyps)
    errors = np.zeros(len(refs), dtype=np.int64)
    for i, chunks in enumerate(out.alignments):
        for c in chunks:
            if c.type in ("substitute", "delete"):
                errors[i] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errors[i] += c.hyp_end_idx - c.hyp_start_idx
    tokens = np.array([len(r.split()) for r in refs], dtype=np.int64)
    return errors, tokens


def greedy_decode(logits: torch.Tensor, tokenizer, frame_lengths: torch.Tensor | None = None) -> list[str]:
    """Best-path CTC decoding: argmax per frame, then the tokenizer merges repeats and drops blanks.

    logits: [B, T, V]; frame_lengths: [B] real frames (padded frames are cut off).
    """
    ids = logits.argmax(-1).cpu()
    seqs = []
    for b in range(ids.shape[0]):
        n = int(frame_lengths[b]) if frame_lengths is not None else ids.shape[1]
        seqs.append(ids[b, :n].tolist())
    return tokenizer.batch_decode(seqs)


def real_time_factor(processing_seconds: float, audio_seconds: float) -> float:
    """Processing time divided by audio duration (below 1 is faster than real time)."""
    if audio_seconds <= 0:
        raise ValueError("audio duration must be positive")
    return processing_seconds / audio_seconds


def guess_unit(texts: Sequence[str]) -> Unit:
    """'char' when most non-space characters are CJK, else 'word'."""
    chars = [c for t in texts for c in t if not c.isspace()]
    cjk = sum(1 for c in chars if "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff")
    return "char" if chars and cjk / len(chars) > 0.5 else "word"


# an error rate at or above this leaves a model unusable: rankings among such models say nothing
UNUSABLE_ERROR_RATE = 0.90


def unusable_note(rates, *, what: str) -> str | None:
    """One line when every error rate in ``rates`` is at or above :data:`UNUSABLE_ERROR_RATE` (else None):
    on a real checkpoint every pruned candidate can be broken before healing, whatever picked it."""
    rates = list(rates)
    if rates and min(rates) >= UNUSABLE_ERROR_RATE:
        return (f"every {what} is unusable before healing (error rate >= {100 * UNUSABLE_ERROR_RATE:.0f}%, "
                f"best {100 * min(rates):.2f}%); consider removing fewer layers")
    return None


def rate_name(unit: str | None) -> str:
    """What an error rate of ``unit`` is called: WER for words, CER for characters."""
    return "WER" if unit == "word" else "CER"
