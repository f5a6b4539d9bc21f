"""Build Kaldi dirs from an official AISHELL-1 download.

Input tree (the official ``data_aishell``, speaker tarballs extracted)::

    data_aishell/wav/{train,dev,test}/<speaker>/<utt>.wav
    data_aishell/transcript/aishell_transcript_v0.8.txt

Output: ``<out>/aishell_{train,dev,test}/{wav.scp,text,utt2spk,spk2utt}``,
sorted by utterance id. As in the standard Kaldi recipe, utterances without a
transcript are dropped and the speaker is the directory the wav lies in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data import write_corpus_dir
from .errors import ComflpError
from .paths import REPO_ROOT

log = logging.getLogger(__name__)

TRANSCRIPT = Path("transcript") / "aishell_transcript_v0.8.txt"
SPLITS = ("train", "dev", "test")


def read_transcripts(path: Path) -> dict[str, str]:
    """``utt word word ...`` lines -> {utt: "word word ..."}; blank transcripts are skipped."""
    out: dict[str, str] = {}
    try:
        text_lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ComflpError(f"{path}: not UTF-8 text (byte offset {err.start}); convert it to UTF-8") from None
    for line in text_lines:
        utt, _, text = line.strip().partition(" ")
        text = " ".join(text.split())
        if utt and text:
            out[utt] = text
    return out


def prepare(corpus_root: str | Path, out_dir: str | Path = REPO_ROOT / "AISHELL1") -> dict[str, int]:
    """Write the three Kaldi dirs; returns the number of utterances kept per split."""
    root = Path(corpus_root)
    if not root.is_dir():
        raise ComflpError(f"AISHELL-1 root not found: {root}")
    transcript = root / TRANSCRIPT
    if not transcript.is_file():
        raise ComflpError(f"transcript not found: {transcript} (expected the official data_aishell tree)")
    texts = read_transcripts(transcript)
    if not texts:
        raise ComflpError(f"{transcript} holds no transcripts")
    # check every split before writing any, so a bad tree leaves nothing half-written
    found: dict[str, list] = {}
    for split in SPLITS:
        wav_dir = root / "wav" / split
        if not wav_dir.is_dir():
            raise ComflpError(f"audio dir not found: {wav_dir}")
        wavs = sorted(wav_dir.glob("*/*.wav"))
        if not wavs:
            tars = list(wav_dir.glob("*.tar.gz"))
            hint = f" ({len(tars)} speaker tarballs found: extract them first)" if tars else ""
            raise ComflpError(f"no wav files under {wav_dir}/<speaker>/{hint}")
        rows = [(w.stem, w.resolve(), w.parent.name) for w in wavs if w.stem in texts]
        if not rows:
            raise ComflpError(f"none of the {len(wavs)} wav files under {wav_dir} has a transcript in {transcript}")
        found[split] = (wavs, rows)
    for split in SPLITS:
        kaldi = Path(out_dir) / f"aishell_{split}"
        if kaldi.exists() and not kaldi.is_dir():
            raise ComflpError(f"{kaldi} is a file; a directory is needed here")
    counts: dict[str, int] = {}
    for split in SPLITS:
        wavs, rows = found[split]
        dropped = len(wavs) - len(rows)
        kaldi = Path(out_dir) / f"aishell_{split}"
        write_corpus_dir(kaldi, [(u, p, texts[u], s) for u, p, s in rows])
        counts[split] = len(rows)
        log.info("%s: %d utterances (%d without transcript dropped) -> %s", split, len(rows), dropped, kaldi)
    return counts
