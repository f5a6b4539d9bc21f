"""Head kinds: how a model turns audio into text, one object per way.

A family's head kind is named by the family table (``Family.kind``) and :func:`head_of` returns its object.
Everything that differs between the kinds lives here, and the rest of comflp asks the object:

- :class:`CtcHead` (wav2vec2 and its siblings): a CTC head over the encoder's frames. Labels are the
  transcript's token ids; the loss is CTC; distillation compares the real frames; decoding is the best path
  (greedy collapse of one forward); text is scored as it is; no prompt.
- :class:`Seq2SeqHead` (Whisper): a decoder after a prompt (:mod:`comflp.prompt`). Labels are the prompt
  after the start token, the transcript's tokens and the end token; the loss is the model's cross-entropy
  under teacher forcing; distillation compares the label positions; decoding is greedy generation with the
  cache under one cap on new tokens; words are scored through Whisper's normaliser.

The stacks each kind has, the prompt it takes and the optional capabilities it supports (:attr:`HeadKind.supports`)
are attributes; the family table's stacks must be the kind's (a test holds them equal).
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from .data import AudioBatch, Utterance, num_samples
from .errors import ComflpError, first_line
from .metrics import greedy_decode, guess_unit
from .model import base_model, call, encoder_frames, family_of, forward, frame_mask, padding_exact, stack_config
from .model.families import get_module
from .prompt import (ENGLISH_ONLY, Prompt, check_prompt as check_seq2seq_prompt, generate_kwargs, prompt_language,
                     teacher_forcing_labels)
from .vocab import MAX_UNKNOWN_SHARE, check_known_tokens, report_unknown_characters

log = logging.getLogger(__name__)


def _cjk(tokenizer) -> tuple[bool, list[str]]:
    """Whether the tokenizer's vocabulary holds CJK characters, and its letters."""
    letters = [c for token in tokenizer.get_vocab() for c in token if c.isalpha()] if tokenizer is not None else []
    return any("\u3400" <= c <= "\u9fff" for c in letters), letters


def decode_logits(model, tokenizer, logits: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Greedy CTC transcripts of a batch. logits: [B, F, V]; attention_mask: [B, T_input]."""
    mask = frame_mask(model, attention_mask, logits.shape[1])
    return greedy_decode(logits, tokenizer, mask.sum(-1))


def generate_batch(model, tokenizer, batch: AudioBatch, *, max_new_tokens: int, **kwargs) -> list[str]:
    """Greedy generation with the cache (encoder-decoder models): one transcript per utterance of ``batch``.

    ``kwargs`` go to ``generate`` (e.g. ``encoder_outputs`` computed once for many decoders).
    """
    with quiet_generation():
        ids = model.generate(batch.inputs, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, **kwargs)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@contextlib.contextmanager
def quiet_generation():
    """Within the block, transformers logs errors only: it warns on every ``generate`` call that the cap overrides
    its default max_length (and that Whisper passes its suppress tokens beside the generation config); neither
    is the user's doing."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def generation_limit(model, tokenizer, references: Sequence[str] | None = None) -> int:
    """New tokens allowed per utterance, the one cap of every command that generates: twice the longest
    reference's plus 10 when references are given (a cap that stops a broken model babbling to its limit),
    never more than half the decoder's positions."""
    cap = int(getattr(stack_config(model, "decoder"), family_of(model).decoder_positions)) // 2
    if references:
        cap = min(cap, 2 * max(len(tokenizer(r).input_ids) for r in references) + 10)
    return cap


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


class HeadKind(ABC):
    """How a model turns audio into text (one subclass per kind; see the module docstring). The abstract methods
    are what every kind must define; the others have the answer of a kind that does not generate.

    ``name``: the family table's ``kind``; ``stacks``: the layer stacks a model of this kind has;
    ``description``: for messages; ``export_format``: what ``comflp export`` writes for it;
    ``supports``: optional capabilities (``"pad_audio"``: the paper's padded batching means something;
    ``"compare_speed"``: the demo times it against its pruned model; ``"measure"``: its hidden states can be
    measured; ``"train"``: it can be fine-tuned).
    """

    name: str = ""
    stacks: tuple[str, ...] = ("encoder",)
    description: str = ""
    export_format: str = ""
    supports: frozenset[str] = frozenset()

    @abstractmethod
    def check_prompt(self, model, prompt: Prompt | None) -> Prompt:
        """``prompt`` (``--language``/``--task``) checked against ``model``; one line when it cannot take it."""

    @abstractmethod
    def labels(self, model, tokenizer, texts: Sequence[str], *, prompt: Prompt | None = None,
               languages: Sequence[str] | None = None, batch: AudioBatch | None = None) -> torch.Tensor:
        """[B, N] training (and teacher-forcing) labels of ``texts`` (the transcripts of ``batch``), padded with
        -100."""

    def student_output(self, model, tokenizer, batch: AudioBatch, labels: torch.Tensor, *, pad_audio: bool,
                       prompt: Prompt | None = None):
        """The training forward of ``model`` on ``batch`` with ``labels``: its output's ``loss`` and ``logits``."""
        return forward(model, batch.inputs, batch.attention_mask, labels=labels, pad_audio=pad_audio)

    def prepare_training(self, model) -> None:
        """Set what training needs in ``model``'s config (its loss reduction); nothing by default."""

    @abstractmethod
    def check_training_data(self, utts: Sequence[Utterance], tokenizer, model, feature_extractor) -> list[Utterance]:
        """The training utterances that can be trained on (one line when too few or too much is unknown)."""

    @abstractmethod
    def teacher_logits(self, teacher, batch: AudioBatch, labels: torch.Tensor, *, pad_audio: bool,
                       tokenizer=None, prompt: Prompt | None = None) -> torch.Tensor:
        """The teacher's logits on ``batch``, at the student's output positions."""

    @abstractmethod
    def distillation_mask(self, model, batch: AudioBatch, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[B, N] the output positions distillation compares: the real ones."""

    def check_references(self, texts: Sequence[str], tokenizer, *, what: str) -> None:
        """Report (log) what in reference transcripts the model cannot write; nothing by default."""

    def generation_limit(self, model, tokenizer, references: Sequence[str] | None = None) -> int | None:
        """The one cap on new tokens per utterance (None: the kind does not generate)."""
        return None

    def normalizer(self, model, tokenizer, prompt: Prompt | None = None) -> Callable[[str], str] | None:
        """How words are normalised for scoring (None: scored as they are)."""
        return None

    @abstractmethod
    def text_language(self, model, tokenizer, prompt: Prompt | None = None) -> str | None:
        """The language ``model`` writes, where it is known before any audio is heard: "en", "zh" or None."""

    def shared_prefix(self, model, tokenizer, batch: AudioBatch, stack: str, prompt: Prompt | None = None) -> dict:
        """What every candidate pruning of ``stack`` shares on ``batch`` (computed once by the fine search), as
        keyword arguments of :meth:`decode`; nothing by default."""
        return {}

    def forward_stack(self, model, tokenizer, batch: AudioBatch, states, stack: str, *, with_prompt: bool = False,
                      prompt: Prompt | None = None) -> torch.Tensor | None:
        """Run ``model`` on ``batch`` so that the captured ``states`` of ``stack`` fill, and return the [B, T] bool
        mask of the positions measured (:func:`comflp.hidden.forward_stack`); None: the family's own forward on
        the audio (and teacher forcing by :meth:`labels` for a decoder), the default."""
        return None

    @abstractmethod
    def decode(self, model, tokenizer, batch: AudioBatch, *, max_new_tokens: int | None = None,
               prompt: Prompt | None = None, languages: Sequence[str] | None = None, **shared) -> list[str]:
        """Greedy transcripts of ``batch``, the caller having made the batch exact (:func:`decode_batch`)."""


class CtcHead(HeadKind):
    name = "ctc"
    stacks = ("encoder",)
    description = "a CTC model"
    export_format = "onnx"
    supports = frozenset({"pad_audio", "compare_speed", "measure", "train"})

    def check_prompt(self, model, prompt: Prompt | None) -> Prompt:
        prompt = prompt or Prompt()
        if prompt.language or prompt.task or prompt.instruction:
            raise ComflpError(f"--language/--task/--instruction set the prompt of an encoder-decoder model (Whisper) "
                              f"or a speech-LLM; this {model.config.model_type} model has none: leave them out")
        return Prompt()

    def labels(self, model, tokenizer, texts, *, prompt=None, languages=None, batch=None) -> torch.Tensor:
        """The transcripts' token ids. Word-segmented Chinese (AISHELL-1's transcripts) loses its spaces, which
        its vocabularies do not model; text in words keeps them (a word delimiter, or SentencePiece's marks)."""
        ids = [tokenizer(t if guess_unit([t]) == "word" else "".join(t.split())).input_ids for t in texts]
        out = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
        for i, seq in enumerate(ids):
            out[i, : len(seq)] = torch.tensor(seq)
        return out

    def prepare_training(self, model) -> None:
        # a per-utterance mean makes the DDP average over processes equal the one-process loss
        model.config.ctc_loss_reduction = "mean"
        model.config.ctc_zero_infinity = True

    def check_training_data(self, utts, tokenizer, model, feature_extractor):
        """Drop utterances too short for one frame per label (CTC needs it), and report unknown characters."""
        sampling_rate = int(feature_extractor.sampling_rate)
        samples = torch.tensor([num_samples(u, sampling_rate) for u in utts])
        frames = encoder_frames(model, feature_extractor, samples).tolist() if utts else []
        kept, short = [], []
        for u, n in zip(utts, frames):
            chars = sum(1 for c in u.text if not c.isspace())
            (kept if n >= max(1, chars) else short).append(u)
        if short:
            log.warning("dropped %d training utterance(s) too short for their transcript (fewer frames than "
                        "characters), e.g. %s", len(short), ", ".join(u.utt_id for u in short[:3]))
        share = report_unknown_characters([u.text for u in utts], tokenizer, what="training transcripts")
        if share > MAX_UNKNOWN_SHARE:
            raise ComflpError(f"{100 * share:.0f}% of the training transcripts' characters are not in the model's "
                              "vocabulary (see the warning above): wrong corpus or wrong model?")
        if not kept:
            raise ComflpError("no training utterance is long enough for its transcript")
        return kept

    def teacher_logits(self, teacher, batch, labels, *, pad_audio, tokenizer=None, prompt=None):
        return forward(teacher, batch.inputs, batch.attention_mask, pad_audio=pad_audio).logits

    def distillation_mask(self, model, batch, labels, logits):
        return frame_mask(model, batch.attention_mask, logits.shape[1])

    def check_references(self, texts, tokenizer, *, what):
        report_unknown_characters(list(texts), tokenizer, what=what)

    def text_language(self, model, tokenizer, prompt=None):
        """CJK characters in the vocabulary mean Mandarin, letters that are all ASCII mean English (other
        Latin-script languages carry accented letters)."""
        cjk, letters = _cjk(tokenizer)
        if cjk:
            return "zh"
        return "en" if letters and all(c.isascii() for c in letters) else None

    def decode(self, model, tokenizer, batch, *, max_new_tokens=None, prompt=None, languages=None, **shared):
        logits = call(model, batch.inputs, batch.attention_mask).logits
        return decode_logits(model, tokenizer, logits, batch.attention_mask)


class Seq2SeqHead(HeadKind):
    name = "seq2seq"
    stacks = ("encoder", "decoder")
    description = "an encoder-decoder model (Whisper)"
    export_format = "ct2"
    supports = frozenset({"measure", "train"})

    def check_prompt(self, model, prompt: Prompt | None) -> Prompt:
        return check_seq2seq_prompt(model, prompt)

    def labels(self, model, tokenizer, texts, *, prompt=None, languages=None, batch=None) -> torch.Tensor:
        """The prompt after the start token, the transcript's tokens and the end token (teacher forcing)."""
        return teacher_forcing_labels(model, tokenizer, texts, prompt or Prompt(), languages)

    def check_training_data(self, utts, tokenizer, model, feature_extractor):
        """All of them: the model reads a fixed window and its BPE vocabulary spells any text; the tokenizer's
        unknown tokens are counted instead."""
        check_known_tokens([u.text for u in utts], tokenizer, what="training transcripts")
        return list(utts)

    def teacher_logits(self, teacher, batch, labels, *, pad_audio, tokenizer=None, prompt=None):
        # the teacher reads the same transcripts (teacher forcing)
        return forward(teacher, batch.inputs, batch.attention_mask, pad_audio=pad_audio, labels=labels).logits

    def distillation_mask(self, model, batch, labels, logits):
        return labels != -100

    def generation_limit(self, model, tokenizer, references=None):
        return generation_limit(model, tokenizer, references)

    def normalizer(self, model, tokenizer, prompt=None):
        return word_normalizer(model, tokenizer, prompt)

    def text_language(self, model, tokenizer, prompt=None):
        """The prompt says it (``<|en|>`` given or forced); a model without language tokens is English-only
        (OpenAI's ``.en`` checkpoints) unless its vocabulary holds CJK characters (the demo Whisper writes
        Mandarin characters)."""
        said = prompt_language(model, prompt or Prompt())
        if said == ENGLISH_ONLY:
            return "zh" if _cjk(tokenizer)[0] else "en"
        return {"<|en|>": "en", "<|zh|>": "zh"}.get(said)

    def shared_prefix(self, model, tokenizer, batch, stack, prompt=None):
        """The decoder's candidates share the encoder's outputs."""
        return {"encoder_outputs": call(model, batch.inputs, batch.attention_mask)} if stack == "decoder" else {}

    def decode(self, model, tokenizer, batch, *, max_new_tokens=None, prompt=None, languages=None, **shared):
        return generate_batch(model, tokenizer, batch,
                              max_new_tokens=max_new_tokens or generation_limit(model, tokenizer),
                              **shared, **generate_kwargs(prompt or Prompt(), languages))


def instruction(model, processor, prompt: Prompt | None = None) -> str:
    """The transcription request a speech-LLM is sent: ``--instruction``, else its processor's own default
    (GLM-ASR's ``default_transcription_prompt``), else the family table's (``Family.instruction``)."""
    given = (prompt or Prompt()).instruction
    return given or getattr(processor, "default_transcription_prompt", None) or family_of(model).instruction


def _chat_template_error(err: Exception) -> ComflpError:
    return ComflpError(f"the processor's chat template cannot render an audio turn ({type(err).__name__}: "
                       f"{first_line(err)})")


def _user_turn(model, processor, prompt: Prompt | None, audio: dict) -> list[dict]:
    """One user turn: the audio (``audio``: the chat template's audio item), then the transcription request."""
    return [{"role": "user", "content": [{"type": "audio", **audio},
                                         {"type": "text", "text": instruction(model, processor, prompt)}]}]


def chat_prompt(model, processor, prompt: Prompt | None = None) -> str:
    """The text of a speech-LLM's prompt: its chat template rendering one user turn (the audio, then the
    transcription request, :func:`instruction`) and opening the assistant's turn."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return processor.apply_chat_template(_user_turn(model, processor, prompt, {}), add_generation_prompt=True,
                                             tokenize=False)
    except (ValueError, TypeError, KeyError, TemplateError) as err:
        raise _chat_template_error(err) from None


def chat_row(model, processor, wave, prompt: Prompt | None = None) -> dict[str, torch.Tensor]:
    """One utterance's prompt inputs [1, ...] from a processor that takes the audio inside the chat turn
    (``Family.audio_in_chat``, Voxtral's): the waveform handed over as a WAV file of float samples (base64),
    as its tokenizer reads audio, at the feature extractor's rate."""
    import base64
    import io

    import numpy as np
    import soundfile as sf

    rate = int(processor.feature_extractor.sampling_rate)
    encoded = io.BytesIO()
    # float WAV: the samples as they are (16-bit PCM would round them); mistral_common decodes it with soundfile
    sf.write(encoded, np.asarray(wave, dtype=np.float32), rate, format="WAV", subtype="FLOAT")
    turn = _user_turn(model, processor, prompt, {"base64": base64.b64encode(encoded.getvalue()).decode("ascii")})
    audio_kwargs = family_of(model).audio_in_chat(model, processor)
    try:
        row = processor.apply_chat_template(turn, tokenize=True, return_dict=True, add_generation_prompt=True,
                                            processor_kwargs={"audio_kwargs": audio_kwargs})
    except (ValueError, TypeError, KeyError) as err:
        raise _chat_template_error(err) from None
    return {key: torch.as_tensor(value) for key, value in row.items()}


def request_row(model, processor, wave, prompt: Prompt | None = None) -> dict[str, torch.Tensor]:
    """One utterance's prompt inputs [1, ...] from the family's own transcription request
    (``Family.transcription_request``), its language ``prompt.language``; one line for a language it refuses."""
    language = (prompt or Prompt()).language
    try:
        row = family_of(model).transcription_request(model, processor, wave, language)
    except (ValueError, TypeError, KeyError) as err:
        what = f"--language {language}" if language else "its transcription request"
        raise ComflpError(f"{model.config.model_type}: {what}: {first_line(err)}") from None
    return {key: torch.as_tensor(value) for key, value in row.items()}


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-utterance [1, ...] tensors as one [B, ...] tensor, each zero-padded at the end of every dimension to
    the largest (audio features and their masks: zero is padding)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.cat(padded)


def _speech_llm_rows(model, processor, batch: AudioBatch, tails: Sequence[Sequence[int]] | None = None, *,
                     left: bool, prompt: Prompt | None = None) -> dict[str, torch.Tensor]:
    """A speech-LLM's inputs for ``batch``: each utterance's from the processor (the chat prompt with its audio
    placeholders expanded to the audio's length, the audio features and masks), ``tails[i]`` (token ids)
    appended to row i, the token rows padded on the ``left`` (generation continues every row from its end) or
    on the right (teacher forcing: positions count from each row's start), the audio inputs stacked. Also
    ``prompt_lengths`` [B]: each row's prompt tokens."""
    if batch.waves is None:
        raise ComflpError("a speech-LLM's inputs are built from the waveforms, and this batch holds none")
    family = family_of(model)
    if family.transcription_request is not None and (prompt or Prompt()).instruction is None:
        rows = [request_row(model, processor, wave, prompt) for wave in batch.waves]
    elif family.audio_in_chat is not None:
        rows = [chat_row(model, processor, wave, prompt) for wave in batch.waves]
    else:
        text = chat_prompt(model, processor, prompt)
        rate = int(processor.feature_extractor.sampling_rate)
        rows = [processor(text=text, audio=[wave], sampling_rate=rate, return_tensors="pt") for wave in batch.waves]
    tokens = [r["input_ids"][0].tolist() + list(tails[i] if tails else []) for i, r in enumerate(rows)]
    pad = processor.tokenizer.pad_token_id
    pad = pad if pad is not None else processor.tokenizer.eos_token_id
    width = max(map(len, tokens))
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(tokens):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    out.update((key, _stacked([r[key] for r in rows])) for key in rows[0] if key not in out)
    device = next(model.parameters()).device
    out = {key: value.to(device) for key, value in out.items()}
    out["prompt_lengths"] = torch.tensor([r["input_ids"].shape[1] for r in rows], device=device)
    return out


def prompt_inputs(model, processor, batch: AudioBatch, prompt: Prompt | None = None) -> dict[str, torch.Tensor]:
    """A speech-LLM's generation inputs for ``batch``: the prompts, left-padded (:func:`_speech_llm_rows`)."""
    out = _speech_llm_rows(model, processor, batch, left=True, prompt=prompt)
    del out["prompt_lengths"]
    return out


class _Reached(Exception):
    """Stops a forward once the module it was after has been given its input."""


def llm_input_embeddings(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, N, D] what a speech-LLM feeds its LLM for ``inputs``: the prompt's token embeddings with the audio
    tower and projector's output in place of the audio placeholders. Taken from the model's own forward, stopped
    at the LLM (whose module holds the table's decoder layers), so every family merges as it does itself."""
    llm = get_module(base_model(model), family_of(model).decoder.layers.rpartition(".")[0])
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")
        raise _Reached

    handle = llm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if seen.get("embeds") is None:
        raise ComflpError(f"{model.config.model_type}: its forward did not hand its LLM input embeddings")
    return seen["embeds"]


def end_token(model, tokenizer) -> int:
    """The token that ends a transcript: the generation config's (the first of several), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return int(eos if eos is not None else tokenizer.eos_token_id)


def teacher_forced_inputs(model, processor, batch: AudioBatch, prompt: Prompt | None = None
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(inputs, transcript mask, labels) for teacher forcing a speech-LLM: each row its prompt, its transcript's
    tokens and the end token, right-padded; the [B, N] bool mask marks the transcript's tokens; the labels are
    the row's tokens where they are the transcript's or the end, -100 elsewhere (the model shifts them)."""
    tokenizer = processor.tokenizer
    texts = [" ".join((t or "").split()) for t in batch.texts]
    spelled = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    end = end_token(model, tokenizer)
    out = _speech_llm_rows(model, processor, batch, [s + [end] for s in spelled], left=False, prompt=prompt)
    starts = out.pop("prompt_lengths")
    positions = torch.arange(out["input_ids"].shape[1], device=starts.device)[None, :]
    lengths = torch.tensor([len(s) for s in spelled], device=starts.device)
    transcript = (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])
    labelled = (positions >= starts[:, None]) & (positions <= (starts + lengths)[:, None])
    labels = torch.where(labelled, out["input_ids"], torch.full_like(out["input_ids"], -100))
    return out, transcript, labels


def transcripts(model, processor, ids: torch.Tensor) -> list[str]:
    """The transcript in each row of generated ``ids`` [B, N]: the processor's decoding, special tokens
    skipped, the family's own output format stripped (``Family.transcript_decoding``: Qwen3-ASR's language tag,
    GLM-ASR's framing sentence), on one line (an LLM may break its answer into lines, which hyp.txt and
    scoring read as spaces)."""
    extra = dict(family_of(model).transcript_decoding)
    texts = (processor.decode(ids, skip_special_tokens=True, **extra) if extra
             else processor.batch_decode(ids, skip_special_tokens=True))
    return [" ".join(t.split()) for t in texts]


def tower_rows(states: Sequence[torch.Tensor], lengths: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """An audio tower's captured states as [B, T, D] rows, one per utterance (``lengths`` [B]: each one's real
    frames; ``layout``: how the tower holds them, :class:`comflp.model.families.TowerFrames`): ``rows`` as they
    are; ``packed`` [N, D] split by the lengths; ``windows`` [C, T, D], each utterance's ceil(length / T)
    consecutive windows joined. Zero-padded at the end."""
    if layout == "rows":
        return list(states)
    counts = lengths.tolist()
    if layout == "windows":
        width = states[0].shape[1]
        counts = [max(1, -(-n // width)) for n in counts]
        if sum(counts) != states[0].shape[0]:
            raise ComflpError(f"the audio tower ran {states[0].shape[0]} windows of {width} frames where the "
                              f"utterances' lengths make {sum(counts)}")
        return [torch.nn.utils.rnn.pad_sequence([w.reshape(-1, w.shape[-1]) for w in s.split(counts)], batch_first=True)
                for s in states]
    if layout != "packed":
        raise ValueError(f"unknown tower layout {layout!r}")
    return [torch.nn.utils.rnn.pad_sequence(list(s.split(counts)), batch_first=True) for s in states]


class SpeechLlmHead(HeadKind):
    """A speech-LLM: an audio tower and a projector turn the audio into the LLM's audio-token embeddings, and
    the LLM, prompted by its chat template, writes the transcript. Its "tokenizer" is the model's processor.
    Decoding is greedy generation with the cache from the prompt (left-padded rows); teacher forcing (measuring,
    training) appends the transcript and the end token to the prompt (right-padded rows)."""

    name = "speechllm"
    stacks = ("encoder", "decoder")
    description = "a speech-LLM"
    export_format = ""
    supports = frozenset({"measure", "train"})

    def check_prompt(self, model, prompt: Prompt | None) -> Prompt:
        """--instruction for a chat turn; --language for a family whose own transcription request takes one
        (Qwen3-ASR, Voxtral), not both; --task never."""
        prompt = prompt or Prompt()
        family = family_of(model)
        own = family.transcription_request is not None
        if prompt.task or (prompt.language and not own):
            raise ComflpError("--language/--task set Whisper's prompt tokens; a speech-LLM is prompted by its chat "
                              "template with a transcription request (--instruction): leave them out")
        if own and prompt.instruction is not None and (prompt.language or family.audio_in_chat is None):
            raise ComflpError(f"{model.config.model_type} is prompted by its processor's own transcription request "
                              "(--language forces its language)" + (
                                  "; --instruction asks in a chat turn instead, which takes no --language: give one"
                                  if family.audio_in_chat is not None else ": leave --instruction out"))
        if prompt.instruction is not None and not prompt.instruction.strip():
            raise ComflpError("--instruction is empty: give the request the model transcribes by, or leave it out")
        return Prompt(language=prompt.language, instruction=prompt.instruction)

    def labels(self, model, tokenizer, texts, *, prompt=None, languages=None, batch=None) -> torch.Tensor:
        """The teacher-forced rows' labels: the transcript's tokens and the end token, inside the chat prompt
        around ``batch``'s audio (which decides how many audio placeholders each row holds)."""
        if batch is None:
            raise ComflpError("a speech-LLM's labels follow its audio: the batch is needed")
        return self._teacher_forced(model, tokenizer, batch, prompt)[2]

    def student_output(self, model, tokenizer, batch, labels, *, pad_audio, prompt=None):
        inputs = self._teacher_forced(getattr(model, "module", model), tokenizer, batch, prompt)[0]
        return model(**inputs, labels=labels)

    def check_training_data(self, utts, tokenizer, model, feature_extractor):
        """All of them (the LLM's vocabulary spells any text); the tokenizer's unknown tokens are counted."""
        check_known_tokens([u.text for u in utts], tokenizer, what="training transcripts")
        return list(utts)

    def teacher_logits(self, teacher, batch, labels, *, pad_audio, tokenizer=None, prompt=None):
        return teacher(**self._teacher_forced(teacher, tokenizer, batch, prompt)[0]).logits

    def distillation_mask(self, model, batch, labels, logits):
        """The positions whose next token is labelled (logits at t predict the token at t + 1)."""
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask

    def generation_limit(self, model, tokenizer, references=None):
        return generation_limit(model, tokenizer.tokenizer, references)

    def normalizer(self, model, tokenizer, prompt=None):
        return normalize_words

    def text_language(self, model, tokenizer, prompt=None):
        """Unknown before any audio is heard: an LLM's vocabulary spells many languages."""
        return None

    def _teacher_forced(self, model, processor, batch, prompt):
        """:func:`teacher_forced_inputs` of ``batch``, built once for the student, the teacher and the mask of a
        training step (the last batch's are kept, keyed by what they are made of)."""
        key = (id(processor), tuple(batch.utt_ids), tuple(batch.texts), str(next(model.parameters()).device),
               instruction(model, processor, prompt), (prompt or Prompt()).language)
        if getattr(self, "_last", (None,))[0] != key:
            self._last = (key, teacher_forced_inputs(model, processor, batch, prompt))
        return self._last[1]

    def forward_stack(self, model, tokenizer, batch, states, stack, *, with_prompt=False, prompt=None):
        """Teacher forcing inside the chat prompt (:func:`teacher_forced_inputs`). The LLM's states are measured
        at the transcript's tokens (``with_prompt``: at every real token); the audio tower's at its real frames,
        where the family table's ``audio_frames`` counts them (a packed tower's states split back into rows)."""
        inputs, transcript, _ = teacher_forced_inputs(model, tokenizer, batch, prompt)
        model(**inputs)
        if stack == "decoder":
            return inputs["attention_mask"].bool() if with_prompt else transcript
        counted = family_of(model).audio_frames
        if counted is None:
            raise ComflpError(f"measuring the audio tower of a {model.config.model_type} model is not offered yet "
                              "(the family table does not count its frames); --stack decoder measures its LLM")
        counted_from = inputs[counted.mask] if counted.mask else torch.tensor([len(w) for w in batch.waves])
        lengths = counted.lengths(base_model(model), counted_from, tokenizer.feature_extractor).to(states[0].device)
        states[:] = tower_rows(states, lengths, counted.layout)
        return torch.arange(states[0].shape[1], device=lengths.device)[None, :] < lengths[:, None]

    def shared_prefix(self, model, tokenizer, batch, stack, prompt=None):
        """Every candidate of either stack decodes from the same prompt and audio inputs; the LLM's candidates
        from the same input embeddings too (the audio tower and projector's output in the prompt's), computed
        once per batch, and the prompt's prefill through the kept layers they share
        (:class:`comflp.prefill.PromptPrefills`)."""
        inputs = prompt_inputs(model, tokenizer, batch, prompt)
        if stack != "decoder":
            return {"prompt_inputs": inputs}
        from .prefill import PromptPrefills

        inputs = {"inputs_embeds": llm_input_embeddings(model, inputs), "attention_mask": inputs["attention_mask"]}
        return {"prompt_inputs": inputs, "prefills": PromptPrefills(model)}

    def decode(self, model, tokenizer, batch, *, max_new_tokens=None, prompt=None, languages=None, **shared):
        inputs = shared.get("prompt_inputs") or prompt_inputs(model, tokenizer, batch, prompt)
        # generate returns the prompt's ids before the new ones, unless it was given embeddings only
        start = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        prefills = shared.get("prefills")
        with quiet_generation(), (prefills.replayed(model) if prefills is not None else contextlib.nullcontext()):
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens or self.generation_limit(model, tokenizer),
                                 do_sample=False, num_beams=1)
        return transcripts(model, tokenizer, ids[:, start:])


HEADS: dict[str, HeadKind] = {head.name: head for head in (CtcHead(), Seq2SeqHead(), SpeechLlmHead())}


def head_of(model) -> HeadKind:
    """The head kind of ``model``, as the family table names it."""
    return HEADS[family_of(model).kind]


def require(model, capability: str, what: str) -> HeadKind:
    """``model``'s head kind, or one line when the kind does not offer ``capability`` (``"measure"``,
    ``"train"``; :attr:`HeadKind.supports`) for ``what`` the command does."""
    head = head_of(model)
    if capability not in head.supports:
        raise ComflpError(f"{what} {head.description} is not offered yet; comflp decodes, searches (fine search "
                          "and GLP) and prunes it")
    return head


def check_prompt(model, prompt: Prompt | None) -> Prompt:
    """``prompt`` (``--language``/``--task``) checked for ``model``: refused in one line by a model without a
    prompt (CTC), checked against the generation config otherwise (:func:`comflp.prompt.check_prompt`)."""
    return head_of(model).check_prompt(model, prompt)


def decode_batch(model, tokenizer, batch: AudioBatch, *, pad_audio: bool = False,
                 max_new_tokens: int | None = None, prompt: Prompt | None = None) -> list[str]:
    """Greedy transcripts of one padded batch (batch-invariant unless ``pad_audio``): best-path CTC, or greedy
    generation for an encoder-decoder model (``max_new_tokens``: default :func:`generation_limit`) with
    ``prompt``'s language and task (none given: the checkpoint's, and its own detection of the language)."""
    exact = (contextlib.nullcontext() if pad_audio
             else padding_exact(model, batch.attention_mask.sum(-1).tolist()))
    with exact:
        return head_of(model).decode(model, tokenizer, batch, max_new_tokens=max_new_tokens, prompt=prompt)
