"""The prompt of an encoder-decoder model: the tokens before the transcript.

Whisper decodes after ``<|startoftranscript|>``, a language token (multilingual
models), a task token and ``<|notimestamps|>``. comflp builds that prompt in one
place, so that generation (decoding, fine search, GLP, testing), teacher-forced
measuring of the decoder and the fine-tuning labels all use the tokens the model
decodes with:

- the language and task are the user's (``--language``, ``--task``), else what
  the checkpoint's generation config forces, else (a multilingual checkpoint
  that forces none) the language the *full* model detects for each utterance,
  detected once (:func:`detect_languages`);
- the token ids follow transformers' own rule for Whisper's initial tokens
  (``WhisperGenerationMixin._retrieve_init_tokens``), checked in the tests
  against what ``generate`` emits.

A model without a prompt (CTC) ignores all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .errors import ComflpError

if TYPE_CHECKING:
    from .data import AudioBatch

TASKS = ("transcribe", "translate")


@dataclass(frozen=True)
class Prompt:
    """What the user asked for: ``language`` ("en", "english" or "<|en|>") and ``task`` ("transcribe" or
    "translate"), Whisper's; None leaves each to the checkpoint (and the language, if it forces none, to
    detection). ``instruction``: a speech-LLM's transcription request (None: its processor's default, else the
    family table's)."""

    language: str | None = None
    task: str | None = None
    instruction: str | None = None

    def to_dict(self) -> dict:
        return {"language": self.language, "task": self.task,
                **({"instruction": self.instruction} if self.instruction else {})}


def _generation_config(model):
    return getattr(model, "generation_config", None)


def language_token(model, language: str) -> str:
    """The language token of ``language`` in ``model``'s ``lang_to_id`` (one line naming what it knows if none)."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    known = getattr(_generation_config(model), "lang_to_id", None) or {}
    name = language.strip().lower()
    for token in (name, f"<|{name}|>", f"<|{TO_LANGUAGE_CODE.get(name, '')}|>"):
        if token in known:
            return token
    if not known:
        raise ComflpError(f"--language {language}: this model has no language tokens (an English-only or "
                          "single-language checkpoint); leave --language out")
    codes = ", ".join(sorted(t.strip("<|>") for t in known)[:12])
    raise ComflpError(f"--language {language}: not a language of this model (it knows {codes}"
                      f"{', ...' if len(known) > 12 else ''})")


def check_prompt(model, prompt: Prompt | None) -> Prompt:
    """``prompt`` checked against the generation config of ``model``, a model that decodes after a prompt; the
    language becomes its token. (:func:`comflp.heads.check_prompt` asks the model's head kind first: a CTC
    model refuses any prompt.)"""
    prompt = prompt or Prompt()
    if prompt.instruction:
        raise ComflpError("--instruction is a speech-LLM's transcription request; Whisper's prompt is its language "
                          "and task tokens (--language, --task)")
    language = language_token(model, prompt.language) if prompt.language else None
    if prompt.task is not None:
        tasks = getattr(_generation_config(model), "task_to_id", None) or {}
        if prompt.task not in TASKS:
            raise ComflpError(f"--task {prompt.task}: one of {', '.join(TASKS)}")
        if prompt.task not in tasks:
            raise ComflpError(f"--task {prompt.task}: this model has no task tokens (an English-only checkpoint "
                              "only transcribes); leave --task out")
    return Prompt(language, prompt.task)


ENGLISH_ONLY = "english-only"  # prompt_language's answer for a model without language tokens


def prompt_language(model, prompt: Prompt) -> str | None:
    """The language token the prompt is known to carry before any audio is heard: the one given, else the
    generation config's (``language`` or the one ``forced_decoder_ids`` names); :data:`ENGLISH_ONLY` for a
    model without language tokens; None when it is detected per utterance."""
    config = _generation_config(model)
    lang_to_id = getattr(config, "lang_to_id", None) or {}
    if not lang_to_id:
        return ENGLISH_ONLY
    if prompt.language:
        return language_token(model, prompt.language)
    if getattr(config, "language", None):
        return language_token(model, config.language)
    if getattr(config, "task", None) is None:
        forced = getattr(config, "forced_decoder_ids", None) or getattr(model.config, "forced_decoder_ids", None)
        names = {v: k for k, v in lang_to_id.items()}
        if forced and forced[0][0] == 1 and forced[0][1] in names:
            return names[forced[0][1]]
    return None


def generate_kwargs(prompt: Prompt, languages: Sequence[str] | None) -> dict:
    """What ``generate`` takes for ``prompt``: the language given, else the detected ``languages`` (one per
    utterance), and the task."""
    out = {}
    if prompt.language or languages is not None:
        out["language"] = prompt.language or list(languages)
    if prompt.task:
        out["task"] = prompt.task
    return out


def language_is_forced(model) -> bool:
    """Whether generation's prompt has its language decided without looking at the audio: the model has no
    language tokens (``lang_to_id``), or its generation config sets ``language``, or its ``forced_decoder_ids``
    name one after the start token. Otherwise transformers detects each utterance's language (its rule in
    ``WhisperGenerationMixin._retrieve_init_tokens``)."""
    config = getattr(model, "generation_config", None)
    if not getattr(config, "lang_to_id", None) or getattr(config, "language", None):
        return True
    if getattr(config, "task", None) is not None:  # transformers then ignores forced_decoder_ids
        return False
    forced = getattr(config, "forced_decoder_ids", None) or getattr(model.config, "forced_decoder_ids", None)
    return bool(forced) and forced[0][0] == 1 and forced[0][1] is not None


def needs_detection(model, prompt: Prompt) -> bool:
    """True when the prompt's language must be detected from the audio (none given, none forced)."""
    return prompt.language is None and not language_is_forced(model)


def prefix_ids(model, prompt: Prompt, language: str | None = None) -> list[int]:
    """The decoder's prompt token ids, start token first, for ``prompt`` (``language``: an utterance's
    detected language token, used when the prompt gives none).

    transformers' rule: the start token; a language token (the one given, else the one the generation config
    forces in ``forced_decoder_ids``, else the detected one) when the model has ``lang_to_id``; a task token
    (the one given, else a forced one, else ``transcribe`` once a language is set); ``<|notimestamps|>``
    when the model has one. A model without these fields (the demo Whisper) has only the start token.
    """
    config = _generation_config(model)
    start = model.config.decoder_start_token_id
    lang_to_id = getattr(config, "lang_to_id", None) or {}
    task_to_id = getattr(config, "task_to_id", None) or {}
    language = prompt.language or getattr(config, "language", None) or language
    task = prompt.task or getattr(config, "task", None)
    # transformers reads forced_decoder_ids only when neither a language nor a task is set
    forced = [] if language or task else \
        (getattr(config, "forced_decoder_ids", None) or getattr(model.config, "forced_decoder_ids", None) or [])
    forced_ids = [token for _, token in sorted(forced)]  # positions 1, 2, ... after the start token
    ids = [start]
    if lang_to_id:
        if language is not None:
            ids.append(lang_to_id[language_token(model, language)])
        elif forced_ids and forced_ids[0] in lang_to_id.values():
            ids.append(forced_ids[0])
    forced_task = next((t for t in forced_ids if t in task_to_id.values()), None)
    if task is not None and task in task_to_id:
        ids.append(task_to_id[task])
    elif forced_task is not None:
        ids.append(forced_task)
    elif language is not None and "transcribe" in task_to_id:
        ids.append(task_to_id["transcribe"])
    no_timestamps = getattr(config, "no_timestamps_token_id", None)
    if no_timestamps is not None and not getattr(config, "return_timestamps", False):
        ids.append(no_timestamps)
    elif not lang_to_id and not task_to_id:  # an English-only checkpoint: its forced tokens as they are
        ids += [t for t in forced_ids if t is not None and t not in ids]
    return ids


def teacher_forcing_labels(model, tokenizer, texts: Sequence[str], prompt: Prompt,
                           languages: Sequence[str | None] | None = None) -> torch.Tensor:
    """[B, N] labels for teacher forcing: the prompt after the start token, the transcript's tokens and the end
    token, padded with -100 (the model shifts them right behind its start token). ``languages``: each
    utterance's detected language token when the prompt needs one."""
    eos = model.generation_config.eos_token_id if _generation_config(model) is not None else None
    eos = eos if eos is not None else model.config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    rows = []
    for i, text in enumerate(texts):
        prefix = prefix_ids(model, prompt, languages[i] if languages is not None else None)[1:]
        rows.append(prefix + tokenizer(text, add_special_tokens=False).input_ids + [eos])
    out = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
    for i, seq in enumerate(rows):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def detect_languages(model, batch: AudioBatch, prompt: Prompt | None = None) -> list[str] | None:
    """The language token (``<|en|>``…) that ``model`` detects for each utterance of ``batch``, or None when
    ``prompt`` gives the language or the checkpoint forces one (:func:`needs_detection`).

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
