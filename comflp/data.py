"""Kaldi-style corpus dirs: read, validate, load audio, batch.

A corpus dir holds ``wav.scp`` (``utt-id path``), ``text`` (``utt-id
transcript``) and optionally ``utt2spk``. Relative audio paths are resolved
against the corpus dir first, then against the working directory. Order is
``wav.scp`` order everywhere (the paper's unshuffled loader); batching may
sort by length inside a chosen subset, never change the subset.

Every problem with the input raises :class:`~comflp.errors.ComflpError` with
one line that names the culprit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr
import torch

from .errors import ComflpError

_FIRST_FEW = 3
# the Kaldi data dir: one "<utt> <value>" line per utterance in each table
WAV_SCP, TEXT, UTT2SPK, SPK2UTT = "wav.scp", "text", "utt2spk", "spk2utt"


@dataclass(frozen=True)
class Utterance:
    """One line of a corpus dir; ``text`` is ``None`` when the dir has no ``text``."""

    utt_id: str
    path: Path
    text: str | None
    speaker: str | None = None


def _read_table(path: Path, *, allow_empty_value: bool = False) -> list[tuple[str, str]]:
    """Kaldi table: ``key value`` per line, split at the first run of spaces or tabs (a UTF-8 BOM is ignored)."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        line_no = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ComflpError(f"{path}:{line_no}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}); convert the file to UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        key, value = parts[0], (parts[1].strip() if len(parts) > 1 else "")
        if not value and not allow_empty_value:
            raise ComflpError(f"{path}:{lineno}: utterance {key} has no value")
        if key in seen:
            raise ComflpError(f"{path}:{lineno}: utterance id {key} appears twice")
        seen.add(key)
        rows.append((key, value))
    return rows


def _first_few(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_FIRST_FEW])
    return shown + (", ..." if len(ids) > _FIRST_FEW else "")


def _resolve(data_dir: Path, value: str) -> Path:
    p = Path(value)
    if p.is_absolute():
        return p
    beside = data_dir / p
    return beside if beside.exists() or not p.exists() else p


def read_corpus_dir(data_dir: str | os.PathLike, *, require_text: bool = True,
                    check_files: bool = True) -> list[Utterance]:
    """Read and validate a Kaldi corpus dir; returns utterances in ``wav.scp`` order.

    Raises ComflpError for: a missing dir or ``wav.scp``; a pipe command in
    ``wav.scp``; a missing audio file (naming the utt id and path); ids in
    ``text`` but not in ``wav.scp`` or the reverse (count and first few);
    empty transcripts.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ComflpError(f"corpus dir not found: {data_dir}")
    scp = data_dir / WAV_SCP
    if not scp.is_file():
        raise ComflpError(f"no wav.scp in corpus dir {data_dir}")
    wavs = _read_table(scp)
    if not wavs:
        raise ComflpError(f"{scp} lists no utterances")
    for utt, value in wavs:
        if value.endswith("|") or value.startswith("|"):
            raise ComflpError(f"{scp}: utterance {utt} is a pipe command ({value}); pipes are not supported, "
                              "extract the audio to files and list their paths")

    texts: dict[str, str] | None = None
    text_file = data_dir / TEXT
    if text_file.is_file():
        text_rows = _read_table(text_file, allow_empty_value=True)
        empty = [u for u, t in text_rows if not t.strip()]
        if empty:
            raise ComflpError(f"{text_file}: {len(empty)} empty transcript(s) ({_first_few(empty)})")
        texts = dict(text_rows)
        wav_ids = {u for u, _ in wavs}
        only_text = [u for u, _ in text_rows if u not in wav_ids]
        only_wav = [u for u, _ in wavs if u not in texts]
        if only_text:
            raise ComflpError(f"{len(only_text)} id(s) in {text_file} are not in {scp} ({_first_few(only_text)})")
        if only_wav:
            raise ComflpError(f"{len(only_wav)} id(s) in {scp} are not in {text_file} ({_first_few(only_wav)})")
    elif require_text:
        raise ComflpError(f"no text file in corpus dir {data_dir} (transcripts are needed here)")

    speakers: dict[str, str] = {}
    if (data_dir / UTT2SPK).is_file():
        speakers = dict(_read_table(data_dir / UTT2SPK))

    utts = []
    for utt, value in wavs:
        path = _resolve(data_dir, value)
        if check_files and not path.is_file():
            raise ComflpError(f"utterance {utt}: audio file not found: {path}")
        utts.append(Utterance(utt, path, texts[utt] if texts is not None else None, speakers.get(utt)))
    return utts


def is_corpus_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Kaldi data dir (it has a ``wav.scp``)."""
    return (Path(path) / WAV_SCP).is_file()


def write_corpus_dir(data_dir: str | os.PathLike, rows: Sequence[tuple[str, str, str, str]]) -> Path:
    """Write a Kaldi data dir from ``(utt, wav path, transcript, speaker)`` rows, in their order.

    Writes ``wav.scp``, ``text``, ``utt2spk`` and ``spk2utt`` (speakers sorted),
    each atomically, so that :func:`read_corpus_dir` reads back the same rows.
    """
    from . import atomic

    data_dir = Path(data_dir)
    atomic.write_text(data_dir / WAV_SCP, "".join(f"{u} {w}\n" for u, w, _, _ in rows))
    atomic.write_text(data_dir / TEXT, "".join(f"{u} {t}\n" for u, _, t, _ in rows))
    atomic.write_text(data_dir / UTT2SPK, "".join(f"{u} {s}\n" for u, _, _, s in rows))
    spk2utt: dict[str, list[str]] = {}
    for u, _, _, s in rows:
        spk2utt.setdefault(s, []).append(u)
    atomic.write_text(data_dir / SPK2UTT, "".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))
    return data_dir


def _readable(path) -> object:
    """What soundfile reads: a file path, or the bytes/path of a dataset row (``comflp.hfdata.DatasetAudio``)."""
    return path.open_audio() if hasattr(path, "open_audio") else str(path)


def load_audio(path: str | os.PathLike, sampling_rate: int, *, utt_id: str | None = None) -> np.ndarray:
    """Read an audio file (or a dataset row's audio) as float32 mono at ``sampling_rate`` (downmix, then resample with soxr)."""
    try:
        wave, sr = sf.read(_readable(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for bad files
        who = f" (utterance {utt_id})" if utt_id else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ComflpError(f"cannot read audio file {path}{who}: {reason}") from None
    wave = wave.mean(axis=1)
    if wave.size == 0:
        raise ComflpError(f"audio file {path} is empty" + (f" (utterance {utt_id})" if utt_id else ""))
    if sr != sampling_rate:
        wave = soxr.resample(wave, sr, sampling_rate).astype(np.float32)
    return wave


def audio_duration(path: str | os.PathLike, *, utt_id: str | None = None) -> float:
    """Duration in seconds from the file header (no decoding)."""
    try:
        info = sf.info(_readable(path))
    except Exception as err:
        who = f" (utterance {utt_id})" if utt_id else ""
        raise ComflpError(f"cannot read audio file {path}{who}: {str(err).splitlines()[0]}") from None
    return info.frames / info.samplerate


def num_samples(utt: Utterance, sampling_rate: int) -> int:
    """Samples of ``utt`` after resampling to ``sampling_rate``, from the file header."""
    return int(round(audio_duration(utt.path, utt_id=utt.utt_id) * sampling_rate))


@dataclass
class AudioBatch:
    """The model inputs of B utterances, padded.

    inputs: what the feature extractor makes of the audio, the model's first input: [B, T] float32
    samples (``input_values``, normalised) or [B, T, C] feature frames (``input_features``);
    attention_mask: [B, T] long, 1 on the inputs' real time steps; lengths: [B] audio samples;
    waves: the B resampled waveforms themselves (float32 numpy), for a processor that builds the model's whole
    input from the audio (a speech-LLM's: the prompt's audio placeholders follow the audio's length).
    """

    utt_ids: list[str]
    texts: list[str | None]
    inputs: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    waves: list | None = None

    def to(self, device: torch.device | str) -> "AudioBatch":
        return AudioBatch(self.utt_ids, self.texts, self.inputs.to(device),
                          self.attention_mask.to(device), self.lengths.to(device), self.waves)


def collate(utts: Sequence[Utterance], feature_extractor) -> AudioBatch:
    """Load, resample and pad ``utts`` with the model's feature extractor (raw audio or feature frames)."""
    sr = int(feature_extractor.sampling_rate)
    waves = [load_audio(u.path, sr, utt_id=u.utt_id) for u in utts]
    # an extractor with a fixed window (Whisper's 30 s) pads every utterance to it; the others to the longest
    padding = "max_length" if getattr(feature_extractor, "n_samples", None) else True
    feats = feature_extractor(waves, sampling_rate=sr, padding=padding, return_attention_mask=True,
                              return_tensors="pt")
    inputs = feats[feature_extractor.model_input_names[0]]
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    mask = feats.get("attention_mask")
    if mask is None:  # raw audio: the real samples
        mask = (torch.arange(inputs.shape[1])[None, :] < lengths[:, None]).long()
    return AudioBatch([u.utt_id for u in utts], [u.text for u in utts], inputs, mask.long(), lengths, waves)


def length_sorted_batches(utts: Sequence[Utterance], *, batch_size: int | None = None,
                          max_seconds: float | None = None, descending: bool = True) -> list[list[Utterance]]:
    """Group ``utts`` into batches of similar length (little padding).

    Either ``batch_size`` utterances per batch, or as many as fit in
    ``max_seconds`` of padded audio (longest x count). The set of utterances
    is unchanged; only their grouping and order are.
    """
    if (batch_size is None) == (max_seconds is None):
        raise ValueError("give exactly one of batch_size and max_seconds")
    durations = [audio_duration(u.path, utt_id=u.utt_id) for u in utts]
    order = sorted(range(len(utts)), key=lambda i: durations[i], reverse=descending)
    batches: list[list[Utterance]] = []
    current: list[int] = []
    for i in order:
        if batch_size is not None:
            full = len(current) == batch_size
        else:
            longest = max([durations[j] for j in current] + [durations[i]])
            full = bool(current) and longest * (len(current) + 1) > max_seconds
        if full:
            batches.append([utts[j] for j in current])
            current = []
        current.append(i)
    if current:
        batches.append([utts[j] for j in current])
    return batches


def iter_batches(utts: Sequence[Utterance], feature_extractor, *, batch_size: int) -> Iterator[AudioBatch]:
    """Length-sorted padded batches of ``batch_size`` over exactly ``utts``."""
    for group in length_sorted_batches(utts, batch_size=batch_size):
        yield collate(group, feature_extractor)
