"""Transcribe a corpus with a CTC model (best path) or an encoder-decoder model (greedy generation) and score it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .data import AudioBatch, Utterance, iter_batches, num_samples
from .metrics import ErrorRate, Unit, error_rate, greedy_decode, guess_unit
from .errors import ComflpError
from .model import forward, frame_mask, is_encoder_decoder, min_audio_samples
from .prompt import ENGLISH_ONLY, Prompt, generate_kwargs, needs_detection, prompt_language

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


def normalize_words(text: str) -> str:
    """Whisper's basic text normaliser (lower case, no punctuation or symbols), for scoring generated words."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    return BasicTextNormalizer()(text)


def word_normalizer(model, tokenizer, prompt: Prompt | None = None) -> Callable[[str], str]:
    """How generated words are normalised before scoring: Whisper's English normaliser ("eight" = "8",
    British = American spelling, contractions) when the text is known to be English and the tokenizer ships
    the spelling table (``normalizer.json``, as Whisper's do): the prompt's language, or the checkpoint's
    forced one, is English, or the model has no language tokens (an ``.en`` checkpoint). Otherwise Whisper's
    basic normaliser (lower case, no punctuation), which does not know the language."""
    spelling = getattr(tokenizer, "english_spelling_normalizer", None)
    if spelling is not None and prompt_language(model, prompt or Prompt()) in ("<|en|>", ENGLISH_ONLY):
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        return EnglishTextNormalizer(spelling)
    return normalize_words


def text_language(model, tokenizer, prompt: Prompt | None = None) -> str | None:
    """The language ``model`` writes, where it is known before any audio is heard: ``"en"`` or ``"zh"``, else
    None.

    An encoder-decoder with language tokens says it through its prompt (``<|en|>`` given or forced). One
    without them is English-only (OpenAI's ``.en`` checkpoints) unless its vocabulary holds CJK characters
    (the demo Whisper writes Mandarin characters). A CTC model says it through its vocabulary: CJK characters
    mean Mandarin, letters that are all ASCII mean English (other Latin-script languages carry accented
    letters)."""
    letters = [c for token in tokenizer.get_vocab() for c in token if c.isalpha()] if tokenizer is not None else []
    cjk = any("\u3400" <= c <= "\u9fff" for c in letters)
    if is_encoder_decoder(model):
        said = prompt_language(model, prompt or Prompt())
        if said == ENGLISH_ONLY:
            return "zh" if cjk else "en"
        return {"<|en|>": "en", "<|zh|>": "zh"}.get(said)
    if cjk:
        return "zh"
    return "en" if letters and all(c.isascii() for c in letters) else None


def generation_limit(model, tokenizer, references: Sequence[str] | None = None) -> int:
    """New tokens allowed per utterance, the one cap of every command that generates: twice the longest
    reference's plus 10 when references are given (a cap that stops a broken model babbling to its limit),
    never more than half the decoder's positions."""
    cap = int(model.config.max_target_positions) // 2
    if references:
        cap = min(cap, 2 * max(len(tokenizer(r).input_ids) for r in references) + 10)
    return cap


def detect_languages(model, batch: AudioBatch, prompt: Prompt | None = None) -> list[str] | None:
    """The language token (``<|en|>``…) that ``model`` detects for each utterance of ``batch``, or None when
    ``prompt`` gives the language or the checkpoint forces one (:func:`comflp.prompt.needs_detection`).

    Detected once with the full model, the languages become every pruned candidate's prompt, so candidates
    are compared on one prompt (a pruned model would detect its own, often wrongly), and generation from
    shared encoder outputs needs no detection (transformers refuses to detect from them and the features
    at once).
    """
    if not needs_detection(model, prompt or Prompt()) or not hasattr(model, "detect_language"):
        return None
    config = model.generation_config
    ids = model.detect_language(input_features=batch.inputs, generation_config=config,
                                num_segment_frames=batch.inputs.shape[-1])
    names = {int(v): k for k, v in config.lang_to_id.items()}
    return [names[int(i)] for i in ids]


def generate_batch(model, tokenizer, batch: AudioBatch, *, max_new_tokens: int, **kwargs) -> list[str]:
    """Greedy generation with the cache (encoder-decoder models): one transcript per utterance of ``batch``.

    ``kwargs`` go to ``generate`` (e.g. ``encoder_outputs`` computed once for many decoders).
    """
    from transformers.utils import logging as hf_logging

    # transformers warns on every call that the cap overrides its default max_length, and that Whisper passes
    # its suppress tokens beside the generation config; neither is the user's doing, so silence both here
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        ids = model.generate(batch.inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


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
    measures or trains on nothing the model can say; warn when some are."""
    share = unknown_token_share(texts, tokenizer)
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


def check_decodable(model, feature_extractor, utts: Sequence[Utterance]) -> None:
    """One line naming the utterances too short to give the model a single frame (they cannot be decoded)."""
    sampling_rate = int(feature_extractor.sampling_rate)
    least = min_audio_samples(model, feature_extractor)
    short = [u.utt_id for u in utts if num_samples(u, sampling_rate) < least]
    if short:
        raise ComflpError(f"{len(short)} utterance(s) are shorter than the model's receptive field "
                          f"({1000 * least / sampling_rate:.0f} ms) and cannot be decoded: "
                          f"{', '.join(short[:3])}{', ...' if len(short) > 3 else ''}; remove them from the corpus")


def decode_logits(model, tokenizer, logits: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Greedy CTC transcripts of a batch. logits: [B, F, V]; attention_mask: [B, T_input]."""
    mask = frame_mask(model, attention_mask, logits.shape[1])
    return greedy_decode(logits, tokenizer, mask.sum(-1))


def decode_batch(model, tokenizer, batch: AudioBatch, *, pad_audio: bool = False,
                 max_new_tokens: int | None = None, prompt: Prompt | None = None) -> list[str]:
    """Greedy transcripts of one padded batch (batch-invariant unless ``pad_audio``): best-path CTC, or greedy
    generation for an encoder-decoder model (``max_new_tokens``: default :func:`generation_limit`) with
    ``prompt``'s language and task (none given: the checkpoint's, and its own detection of the language)."""
    if is_encoder_decoder(model):
        return generate_batch(model, tokenizer, batch, max_new_tokens=max_new_tokens or generation_limit(model, tokenizer),
                              **generate_kwargs(prompt or Prompt(), None))
    logits = forward(model, batch.inputs, batch.attention_mask, pad_audio=pad_audio).logits
    return decode_logits(model, tokenizer, logits, batch.attention_mask)


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
    generative = is_encoder_decoder(model)
    if all(u.text is not None for u in utts) and not generative:  # a BPE vocabulary spells any text
        report_unknown_characters([u.text for u in utts], tokenizer, what="references")
    # one cap for every generation comflp runs (test, validation, fine search): from the references when
    # there are any, so a broken model cannot babble to the decoder's limit on some commands only
    references = [u.text for u in utts] if all(u.text for u in utts) else None
    limit = generation_limit(model, tokenizer, references) if generative else None
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
                         audio, elapsed, normalizer=word_normalizer(model, tokenizer, prompt) if generative else None)


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
