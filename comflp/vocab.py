"""What a model's vocabulary can spell: transcript characters or tokens it does not know, checked before
measuring, training or decoding on them."""

from __future__ import annotations

import logging
from typing import Sequence

from .errors import ComflpError

log = logging.getLogger(__name__)


def unknown_characters(texts: Sequence[str], tokenizer) -> tuple[dict[str, int], int]:
    """Transcript characters missing from the tokenizer's vocabulary: ({char: count}, total characters)."""
    vocab = set(tokenizer.get_vocab())
    unknown: dict[str, int] = {}
    total = 0
    for text in texts:
        for c in text:
            if c.isspace():
                continue
            total += 1
            if c not in vocab:
                unknown[c] = unknown.get(c, 0) + 1
    return unknown, total


# refuse to train or measure on transcripts when more than this share is unknown to the model
MAX_UNKNOWN_SHARE = 0.10


def unknown_token_share(texts: Sequence[str], tokenizer) -> float:
    """The share of the transcripts' tokens that are the tokenizer's unknown token, special tokens aside; a
    transcript that gives no token at all counts as one unknown token. Exact for any tokenizer (a byte-level
    BPE has no unknown characters, a character vocabulary may have many), unlike a character lookup."""
    unk = tokenizer.unk_token_id
    unknown = total = 0
    for text in texts:
        # the text's own tokens: the special tokens a tokenizer adds around it may share the unknown token's id
        # (Whisper's <|endoftext|> is both)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            unknown, total = unknown + 1, total + 1
            continue
        unknown += sum(1 for i in ids if i == unk)
        total += len(ids)
    return unknown / max(total, 1)


def check_known_tokens(texts: Sequence[str], tokenizer, *, what: str) -> None:
    """Refuse (one line) transcripts whose tokens are mostly unknown to the model: teacher forcing on them
    measures or trains on nothing the model can say; warn when some are. A processor (a speech-LLM's) is asked
    through its tokenizer."""
    share = unknown_token_share(texts, getattr(tokenizer, "tokenizer", tokenizer))
    if share > MAX_UNKNOWN_SHARE:
        raise ComflpError(f"{100 * share:.0f}% of the tokens of the {what} are unknown to the model's tokenizer: "
                          "wrong corpus or wrong model?")
    if share:
        log.warning("%.1f%% of the tokens of the %s are unknown to the model's tokenizer", 100 * share, what)


def report_unknown_characters(texts: Sequence[str], tokenizer, *, what: str = "transcripts") -> float:
    """Log how many reference characters the model cannot emit (count and a few examples); returns their share."""
    unknown, total = unknown_characters(texts, tokenizer)
    if not unknown:
        return 0.0
    share = sum(unknown.values()) / max(total, 1)
    examples = ", ".join(f"{c!r} x{n}" for c, n in sorted(unknown.items(), key=lambda kv: -kv[1])[:5])
    log.warning("%d character(s) (%.1f%%) of the %s are not in the model's vocabulary: %s",
                                        sum(unknown.values()), 100 * share, what, examples)
    return share
