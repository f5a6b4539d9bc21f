"""Command-line options shared by several commands, defined once.

Each ``add_*`` function adds one flag (or a small group) to a parser, with the
same name, type check and help text in every command; the ``resolve_*``
functions turn the parsed value into what the library takes, raising
:class:`~comflp.errors.ComflpError` with one line on bad values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import ComflpError
from ..strategy import check_num_layers  # noqa: F401 (the commands' shared flag check, here with the others)
from .argtypes import (ArgumentParser, add_overwrite, fraction, invoked_as, non_negative_float,  # noqa: F401 (re-exported)
                       non_negative_int, positive_float, positive_int, seed, str2bool, threads)


def command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> str:
    """The command line that ran ``parser`` on ``argv`` (None: this process's), as a shell would take it back:
    what a model card gives as the way to reproduce a model."""
    import shlex

    return shlex.join([*parser.prog.split(), *(sys.argv[1:] if argv is None else argv)])


def add_front_end_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--front_end_cache_gb", type=non_negative_float, default=2.0,
                   help="memory (GiB) for keeping each subset batch's front-end outputs (the modules before the "
                        "first layer) between evaluations, so that GLP's steps and a report's strategies compute "
                        "them once; 0 recomputes them every time. Changes speed, never a CER (default: %(default)s)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")


def resolve_device(name: str | None) -> torch.device:
    """The device named by ``--device`` (None: cuda if available, else cpu); one line if unusable."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ComflpError(f"--device {name!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ComflpError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ComflpError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ComflpError(f"--device {name}: {device.type} is not available on this machine")
    return device


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads, default=None, help="torch CPU threads (default: torch's choice)")


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def add_pad_audio(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pad_audio", action="store_true",
                   help="the paper's batching: zero-padded audio goes through the conv feature encoder as a batch, "
                        "so with group norm (wav2vec2-base and the demo model) results change with the batch size. "
                        "Default (without this flag): each utterance is normalised over its own frames only and the "
                        "transformer is batched with an attention mask, so results do not depend on the batch size")


def add_prompt(p: argparse.ArgumentParser) -> None:
    """``--language`` and ``--task``: the prompt of an encoder-decoder model (Whisper); ``--instruction``: a
    speech-LLM's transcription request."""
    p.add_argument("--language", default=None,
                   help="Whisper: the language of the speech (en, english or <|en|>), given to generation, to the "
                        "teacher-forced decoder and to the fine-tuning labels alike (default: what the checkpoint's "
                        "generation config forces; if it forces none, detected from each utterance's audio: by the "
                        "full model, once, when measuring, searching or training, by the model itself when testing). "
                        "Qwen3-ASR and Voxtral: the language their transcription request forces (default: none, "
                        "the model identifies it)")
    p.add_argument("--task", choices=["transcribe", "translate"], default=None,
                   help="Whisper: the task token of the prompt (default: the checkpoint's, else transcribe)")
    p.add_argument("--instruction", default=None,
                   help="speech-LLMs: the transcription request sent after the audio in the user's turn of the chat "
                        "template, the same in decoding, measuring and training (default: the processor's own "
                        "default request where it has one, else \"Transcribe the audio.\"); Voxtral: asks in a chat "
                        "turn instead of its transcription mode; refused for Qwen3-ASR, prompted by its own request")


class _QuietAction(argparse.Action):
    """``--quiet``: no progress bars, transformers' own (the weight-loading bar) included."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import os

        setattr(namespace, self.dest, True)
        if "transformers" in sys.modules:  # imported already (a command run in-process): tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        else:  # read when transformers is imported (importing it here would slow a coarse-only search)
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def add_quiet(p: argparse.ArgumentParser, help: str = "no progress bars") -> None:
    p.add_argument("--quiet", action=_QuietAction, help=help + " (transformers' weight-loading bar included)")


class _StackAction(argparse.Action):
    """``--stack``: ``args.stack`` is the stack meant (encoder or decoder), ``args.stack_name`` the name given
    (a speech-LLM's ``audio``/``llm`` too), checked against the model by :func:`model_stack`."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..model.families import resolve_stack

        namespace.stack, namespace.stack_name = resolve_stack(values), values


def add_stack(p: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    """``--stack``: encoder or decoder; a speech-LLM's ``audio`` (its audio tower, the encoder stack) or ``llm``
    (its LLM's decoder layers, the decoder stack) too."""
    from ..model.families import STACK_ALIASES, STACKS

    p.add_argument("--stack", choices=[*STACKS, *STACK_ALIASES], default=default, action=_StackAction,
                   help=help + "; a speech-LLM's stacks are also called audio (its audio tower: the encoder) "
                               "and llm (its LLM's layers: the decoder)")
    p.set_defaults(stack_name=None)


def model_stack(args: argparse.Namespace, model) -> str:
    """The stack ``--stack`` means for ``model``: one line if the name is not one of its stacks'."""
    from ..model.families import resolve_stack

    return resolve_stack(args.stack_name or args.stack, model)


def resolve_prompt(args: argparse.Namespace):
    """The :class:`comflp.prompt.Prompt` the flags name (checked against the model where it is used)."""
    from ..prompt import Prompt

    return Prompt(getattr(args, "language", None), getattr(args, "task", None), getattr(args, "instruction", None))


def corpus_split(given, split: str, loaded, prompt=None) -> Path:
    """A data-dir flag's value: ``given``, else the embedded corpus's ``split`` in the language the model
    writes (:func:`comflp.decode.text_language`): English for an English model, else the Mandarin default."""
    from ..decode import text_language
    from ..paths import demo_split

    if given is not None:
        return Path(given)
    language = text_language(loaded.model, loaded.tokenizer, prompt) if loaded is not None else None
    return demo_split(split, language if language == "en" else "zh")


DEMO_DATA_HELP = ("the embedded corpus's {split} split in the model's language: the English one for an English "
                  "model (Whisper .en, --language en, a CTC vocabulary of ASCII letters), else the Mandarin one")


def add_dataset_arguments(p: ArgumentParser, *, split: str, replaces: list[argparse.Action]) -> None:
    """``--dataset`` (instead of the Kaldi dir flags ``replaces``, exclusive with them), ``--dataset_split``,
    ``--audio_column``, ``--text_column``."""
    names = " and ".join(a.option_strings[0] for a in replaces)
    p.exclusive_inputs.append(("--dataset", list(replaces)))
    p.add_argument("--dataset", default=None,
                   help=f"a HuggingFace dataset instead of {names} (not both): a dir written by save_to_disk, an "
                        "audiofolder dir (metadata.csv/jsonl with file_name), or a hub id when a hub is reachable")
    p.add_argument("--dataset_split", default=split, help="the split of --dataset to read (default: %(default)s)")
    p.add_argument("--audio_column", default="audio", help="the audio column of --dataset (default: %(default)s)")
    p.add_argument("--text_column", default=None,
                   help="the transcript column of --dataset (default: the first of text, sentence, transcription, "
                        "normalized_text that exists)")


def data_label(args: argparse.Namespace, data_dir) -> str:
    """How outputs record where utterances came from: ``dataset [split]`` or the Kaldi dir."""
    return f"{args.dataset} [{args.dataset_split}]" if getattr(args, "dataset", None) else str(data_dir)


def read_corpus_or_dataset(args: argparse.Namespace, data_dir, *, require_text: bool = True):
    """The utterances of ``args.dataset`` (split ``args.dataset_split``) when given, else of the Kaldi dir
    ``data_dir`` (the embedded corpus generated first if it is that and missing)."""
    from ..hfdata import DatasetSource, read_corpus_or_dataset as read

    from ..demo.corpus import ensure_demo_corpus

    if not getattr(args, "dataset", None):
        ensure_demo_corpus(data_dir)
    return read(DatasetSource.of(args), data_dir, require_text=require_text)


def add_repair(p: argparse.ArgumentParser, *, ranking: bool = False, healing: bool = False) -> None:
    """``--repair`` and its calibration flags (:mod:`comflp.repair`); ``ranking``: the fine search ranks the
    candidates after their repair; ``healing``: fine-tuning starts from the repaired model."""
    from ..strategy import DEFAULT_CALIB_UTTS, DEFAULT_REPAIR_RIDGE, REPAIR_KINDS

    what = ("rank the fine search's candidates after repairing each" if ranking
            else "start healing from the pruned model repaired" if healing else "repair the cuts before saving")
    where = "the training corpus" if healing else f"{DEMO_DATA_HELP.format(split='train')}, the measuring corpus"
    p.add_argument("--repair", choices=REPAIR_KINDS, default="none",
                   help=f"{what}, without training: a map fitted by least squares on calibration activations "
                        "stands in for each removed block and is folded into the kept weights (the result stays a "
                        "plain checkpoint). affine: a per-channel scale and shift, every family (into the "
                        "LayerNorm that ends a post-LN layer, or the feed-forward output of a pre-LN one); linear: "
                        "a full map into a pre-LN layer's feed-forward output (ReplaceMe), refused on post-LN "
                        "layers; a cut at the first layer of a pre-LN stack is left as it is (default: %(default)s)")
    p.add_argument("--calib_data_dir", type=Path, default=None,
                   help="Kaldi dir of the calibration utterances (transcripts needed only for a decoder's cuts) "
                        f"(default: {where})")
    p.add_argument("--calib_utts", type=positive_int, default=DEFAULT_CALIB_UTTS,
                   help="calibration utterances, a seeded sample of --calib_data_dir; every real frame of them is a "
                        "sample of the fit; linear needs more frames than the model is wide (default: %(default)s)")
    p.add_argument("--calib_batch_size", type=positive_int, default=8,
                   help="calibration utterances per forward; the fit does not depend on it (default: %(default)s)")
    p.add_argument("--calib_seed", type=seed, default=0,
                   help="selects the calibration utterances (default: %(default)s)")
    p.add_argument("--repair_ridge", type=non_negative_float, default=DEFAULT_REPAIR_RIDGE,
                   help="ridge term of the fit, relative to the mean input variance; 0 is plain least squares and "
                        "is refused when the fit is singular (default: %(default)s)")


def fit_repair_from_flags(args: argparse.Namespace, loaded, prompt, *, layers=(), decoder_layers=(), candidates=(),
                          stack: str = "encoder"):
    """The repair the ``--repair`` flags ask for (:func:`add_repair`), fitted on their calibration utterances
    (default: the measuring corpus in the model's language) by :func:`comflp.stages.repair`; ``prompt``: the
    model's checked prompt."""
    from ..demo.corpus import read_corpus
    from ..repair import calibration_subset
    from ..stages import repair

    decoder = bool(decoder_layers) or stack == "decoder" and bool(candidates)
    if decoder and loaded.tokenizer is None:
        raise ComflpError(f"{loaded.source} has no tokenizer: repairing decoder cuts needs one (teacher forcing)")
    data_dir = corpus_split(args.calib_data_dir, "train", loaded, prompt)
    chosen = calibration_subset(read_corpus(data_dir, require_text=decoder), args.calib_utts, args.calib_seed)
    return repair(loaded, chosen, layers=layers, decoder_layers=decoder_layers, candidates=candidates, stack=stack,
                  kind=args.repair, ridge=args.repair_ridge, batch_size=args.calib_batch_size, prompt=prompt,
                  data=f"{data_dir} ({len(chosen)} utterances, seed {args.calib_seed})", pad_audio=args.pad_audio,
                  progress=not args.quiet)
