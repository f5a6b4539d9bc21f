"""Export a (pruned) model to the runtimes people deploy with, and check it transcribes what PyTorch does.

- **Whisper → CTranslate2** (the library faster-whisper runs): ``ctranslate2.converters.TransformersConverter``
  writes ``model.bin``; the tokenizer and feature extractor are saved beside it, as faster-whisper reads them.
  The check greedy-decodes the same log-mel features with ``ctranslate2.models.Whisper`` and with the PyTorch
  model (comflp's greedy generation, one cap on new tokens), from the same prompt tokens.
- **CTC families → ONNX**: ``torch.onnx.export`` of ``(inputs, attention_mask) -> logits`` with dynamic batch
  and time axes (:class:`comflp.model.ExactForExport`: the group-norm front end's masked statistics are in the
  graph, so a padded batch gives each utterance what it gets alone). ``--quantization int8`` is ONNX
  Runtime's dynamic quantisation of the exported graph. The check runs ONNX Runtime and PyTorch on the same
  padded batches: the largest logit difference over real frames and the greedy transcripts.

An unquantised export must agree with PyTorch (ONNX logits within :func:`logit_tolerance`, identical
transcripts) or nothing is written; a quantised one reports how far its error rate moved. The export dir
records what was exported and the check (``comflp_export.json``).

The runtimes are the optional extra ``comflp[export]`` (ctranslate2, onnx, onnxruntime); a missing one is
named in one line.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .artifacts import EXPORT_FILE, ONNX_FILE, WRITTEN_BY, source_id, write_dir
from .data import Utterance, iter_batches
from .errors import ComflpError
from .metrics import Unit, guess_unit
from .heads import head_of
from .model import LoadedModel, family_of

log = logging.getLogger(__name__)

FORMATS = ("ct2", "onnx")
QUANTIZATIONS = ("none", "int8", "float16")
NO_TIMESTAMPS = "<|notimestamps|>"  # Whisper's token; CTranslate2 reads timestamps from the id after it
ONNX_OPSET = 17
# largest |logit difference| an unquantised ONNX export may show against PyTorch, in units of the largest |logit|
# when that is above 1: float32 sums in another order differ in proportion to the values summed (demo-12l,
# logits up to about 20: 8e-5 over its test split)
ONNX_TOLERANCE = 1e-4


def _need(module: str, fmt: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ComflpError(f"--format {fmt} needs {module}: pip install 'comflp[export]'") from None


def check_format(model, fmt: str, quantization: str, tokenizer=None) -> None:
    """One line when ``fmt`` or ``quantization`` does not apply to ``model``: Whisper goes to CTranslate2,
    CTC models to ONNX; ONNX offers int8 only. CTranslate2's Whisper needs Whisper's ``<|notimestamps|>`` in
    the vocabulary (``tokenizer``): without it, it takes every token after its unknown-token stand-in for a
    timestamp and decodes something else than the model (the demo Whisper's character vocabulary)."""
    kind, wanted = head_of(model).description, head_of(model).export_format
    own = family_of(model).export_format
    wanted = wanted if own is None else own
    if fmt not in FORMATS:
        raise ComflpError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if not wanted:
        raise ComflpError(f"comflp export has no format for {model.config.model_type} models (neither CTranslate2 "
                          "nor the ONNX graph of a CTC model takes them); the pruned checkpoint itself is the output")
    if fmt != wanted:
        raise ComflpError(f"--format {fmt} does not export {kind}: use --format {wanted}")
    if quantization not in QUANTIZATIONS:
        raise ComflpError(f"--quantization {quantization}: one of {', '.join(QUANTIZATIONS)}")
    if fmt == "ct2" and tokenizer is not None and NO_TIMESTAMPS not in tokenizer.get_vocab():
        raise ComflpError(f"CTranslate2's Whisper decodes with Whisper's special tokens, and this model's vocabulary "
                          f"has no {NO_TIMESTAMPS} (a character vocabulary?): it would read the text tokens as "
                          "timestamps, so there is no faithful CTranslate2 export of it")
    if fmt == "onnx" and quantization == "float16":
        raise ComflpError("--quantization float16 is not offered for ONNX (CPU runtimes gain nothing from it): "
                          "use int8 or none")


@dataclass(frozen=True)
class ExportCheck:
    """The export against PyTorch on the same utterances and batches."""

    utterances: int
    same_transcripts: int
    unit: Unit
    pytorch_error_rate: float
    export_error_rate: float
    max_logit_difference: float | None  # ONNX: over real frames; None for CTranslate2 (it returns tokens)
    max_abs_logit: float | None  # ONNX: PyTorch's largest |logit| over real frames, the difference's scale
    pytorch_seconds: float
    export_seconds: float
    # a graph without exact batching is compared with PyTorch's padded batching (the paper's): its error rate
    # there, beside ``pytorch_error_rate`` (batch-invariant), says how far the batching alone moves it
    padded_batching_error_rate: float | None = None

    @property
    def error_rate_change(self) -> float:
        return self.export_error_rate - self.pytorch_error_rate


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    quantization: str
    exact_batching: bool  # a padded batch gives each utterance what it gets alone
    check: ExportCheck | None


def export(loaded: LoadedModel, output: str | os.PathLike, *, fmt: str, quantization: str = "none",
           check_utts: Sequence[Utterance] = (), batch_size: int = 8, overwrite: bool = False,
           data: str = "", command: str | None = None, prompt=None) -> Exported:
    """Export ``loaded`` to ``output`` in ``fmt`` (``ct2`` or ``onnx``), checked on ``check_utts`` (none: not
    checked) in batches of ``batch_size``; ``data`` names them in the record.

    The export is written to a temp dir and moved into place only once the check has passed; ``output`` must
    be new, empty or (with ``overwrite``) an earlier comflp output.
    """
    check_format(loaded.model, fmt, quantization, loaded.tokenizer)
    if fmt == "ct2":
        _need("ctranslate2", fmt)
    else:
        _need("onnx", fmt)
        _need("onnxruntime", fmt)
    with write_dir(output, kind="export", overwrite=overwrite) as tmp:
        if fmt == "ct2":
            exact = True  # a fixed 30-s window: nothing in the batch changes an utterance
            _to_ct2(loaded, tmp, quantization)
            check = _check_ct2(loaded, tmp, check_utts, batch_size, prompt) if check_utts else None
        else:
            exact = _to_onnx(loaded, tmp, quantization, check_utts, batch_size)
            check = _check_onnx(loaded, tmp / ONNX_FILE, check_utts, batch_size, exact) if check_utts else None
        if loaded.feature_extractor is not None:
            loaded.feature_extractor.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if check is not None and quantization == "none":
            _require_agreement(check, fmt)
        record = {"written_by": WRITTEN_BY, "model": source_id(loaded.source), "format": fmt,
                  "quantization": quantization, "exact_batching": exact, "data": data,
                  "check": asdict(check) if check is not None else None, "command": command,
                  "versions": _versions(fmt)}
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Exported(Path(output), fmt, quantization, exact, check)


def _require_agreement(check: ExportCheck, fmt: str) -> None:
    if check.max_logit_difference is not None and check.max_logit_difference > logit_tolerance(check.max_abs_logit):
        raise ComflpError(f"the ONNX export's logits differ from PyTorch's by up to {check.max_logit_difference:.2e} "
                          f"(tolerance {logit_tolerance(check.max_abs_logit):.1e}): nothing written")
    if check.same_transcripts != check.utterances:
        raise ComflpError(f"the {fmt} export transcribes {check.utterances - check.same_transcripts} of "
                          f"{check.utterances} utterances differently from PyTorch: nothing written")


def logit_tolerance(max_abs_logit: float) -> float:
    """:data:`ONNX_TOLERANCE`, scaled by the largest |logit| when that is above 1."""
    return ONNX_TOLERANCE * max(1.0, max_abs_logit)


def _versions(fmt: str) -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in (("ctranslate2",) if fmt == "ct2" else ("onnx", "onnxruntime")):
        out[name] = _need(name, fmt).__version__
    return out


# ---------------------------------------------------------------------------------------------
# CTranslate2 (Whisper)


def _to_ct2(loaded: LoadedModel, out: Path, quantization: str) -> None:
    import ctranslate2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converter = ctranslate2.converters.TransformersConverter(str(loaded.source))
        converter.convert(str(out), quantization=None if quantization == "none" else quantization, force=True)


def ct2_generate_batch(model, loaded: LoadedModel, batch, prompts: list[list[str]], limit: int) -> list[str]:
    """Greedy transcripts of one batch by the CTranslate2 Whisper ``model`` from the prompt tokens ``prompts``
    (one per utterance), cut at ``limit`` new tokens as comflp's PyTorch generation is."""
    import ctranslate2

    features = ctranslate2.StorageView.from_array(batch.inputs.float().contiguous().numpy())
    # CTranslate2's max_length is not a count of new tokens (it gave max_length / 2 of them with a 4-token
    # prompt), so it is set past the cap, within the decoder's positions, and the output cut to the cap
    room = min(loaded.model.config.max_target_positions, 2 * (limit + max(map(len, prompts))) + 2)
    results = model.generate(features, prompts, beam_size=1, max_length=room)
    return [loaded.tokenizer.decode(r.sequences_ids[0][:limit], skip_special_tokens=True) for r in results]


def ct2_transcribe(model_dir: Path, loaded: LoadedModel, utts: Sequence[Utterance], *, batch_size: int,
                   prompt=None) -> tuple[dict[str, str], float]:
    """Greedy transcripts of ``utts`` by the CTranslate2 Whisper in ``model_dir`` (utterance id -> text) from
    the prompt comflp's PyTorch decoding uses, with its cap on new tokens; and the decoding seconds."""
    import ctranslate2

    from .heads import generation_limit
    from .prompt import detect_languages
    from .prompt import Prompt, needs_detection, prefix_ids

    prompt = prompt or Prompt()
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", intra_threads=torch.get_num_threads())
    references = [u.text for u in utts] if all(u.text for u in utts) else None
    limit = generation_limit(loaded.model, loaded.tokenizer, references)
    texts: dict[str, str] = {}
    seconds = 0.0
    for batch in iter_batches(utts, loaded.feature_extractor, batch_size=batch_size):
        languages = (detect_languages(loaded.model, batch, prompt) if needs_detection(loaded.model, prompt)
                     else [None] * len(batch.utt_ids))
        prompts = [loaded.tokenizer.convert_ids_to_tokens(prefix_ids(loaded.model, prompt, language))
                   for language in languages]
        start = time.perf_counter()
        texts.update(zip(batch.utt_ids, ct2_generate_batch(model, loaded, batch, prompts, limit)))
        seconds += time.perf_counter() - start
    return texts, seconds


def _check_ct2(loaded: LoadedModel, out: Path, utts: Sequence[Utterance], batch_size: int, prompt) -> ExportCheck:
    from .decode import transcribe

    reference = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=batch_size,
                           prompt=prompt)
    texts, seconds = ct2_transcribe(out, loaded, utts, batch_size=batch_size, prompt=prompt)
    return _compare(reference, [texts[u.utt_id] for u in utts], None, seconds)


# ---------------------------------------------------------------------------------------------
# ONNX (CTC)


def _to_onnx(loaded: LoadedModel, out: Path, quantization: str, utts: Sequence[Utterance], batch_size: int) -> bool:
    from .model import ExactForExport

    graph = ExactForExport(loaded.model)
    kind = family_of(loaded.model).input_kind
    example = _example_batch(loaded, utts, batch_size)
    path = out / ONNX_FILE
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-side shapes, which the dynamic axes cover
        # the TorchScript exporter: it takes dynamic axes as named here and needs no onnxscript
        torch.onnx.export(graph, (example.inputs, example.attention_mask), str(path),
                          input_names=[kind, "attention_mask"], output_names=["logits"],
                          dynamic_axes={kind: {0: "batch", 1: "time"}, "attention_mask": {0: "batch", 1: "time"},
                                        "logits": {0: "batch", 1: "frames"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    if quantization == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = out / (ONNX_FILE + ".fp32")
        path.rename(fp32)
        # the matrix products only: ONNX Runtime's integer convolution (ConvInteger) is slower than its float one
        # on CPU, and quantising the front end's convolutions cost the most accuracy
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        fp32.unlink()
    if not graph.exact:
        log.warning("%s reads padding where an ONNX graph cannot mask it: a padded batch gives what the paper's "
                    "batching gives (one utterance per run: exact)", loaded.model.config.model_type)
    return graph.exact


def _example_batch(loaded: LoadedModel, utts: Sequence[Utterance], batch_size: int):
    """Two utterances of different lengths (the tracer then sees a real mask), or a random pair."""
    from .data import AudioBatch

    if len(utts) >= 2:
        return next(iter_batches(list(utts)[:2], loaded.feature_extractor, batch_size=2))
    kind = family_of(loaded.model).input_kind
    if kind == "input_values":
        inputs = torch.randn(2, 16000)
    else:
        width = getattr(loaded.feature_extractor, "feature_size", 80) * getattr(loaded.feature_extractor, "stride", 1)
        inputs = torch.randn(2, 100, width)
    mask = torch.ones(inputs.shape[:2], dtype=torch.long)
    mask[1, inputs.shape[1] // 2:] = 0
    return AudioBatch(["a", "b"], [None, None], inputs, mask, mask.sum(-1))


def onnx_session(path: Path):
    """An ONNX Runtime CPU session using this process's torch threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, batch, kind: str) -> torch.Tensor:
    """[B, F, V] logits of one padded batch from an exported CTC model."""
    feeds = {kind: batch.inputs.float().numpy(), "attention_mask": batch.attention_mask.long().numpy()}
    return torch.from_numpy(session.run(["logits"], feeds)[0])


def _check_onnx(loaded: LoadedModel, path: Path, utts: Sequence[Utterance], batch_size: int,
                exact: bool) -> ExportCheck:
    """ONNX Runtime against PyTorch on the same padded batches: logits over real frames and transcripts against
    PyTorch's batch-invariant forward, or (a graph without exact batching) its padded batching."""
    from dataclasses import replace

    from .decode import Transcription
    from .heads import decode_logits
    from .model import forward, frame_mask

    session = onnx_session(path)
    kind = family_of(loaded.model).input_kind
    ours, padded, theirs, worst, scale = {}, {}, {}, 0.0, 0.0
    torch_s = onnx_s = audio = 0.0
    for batch in iter_batches(utts, loaded.feature_extractor, batch_size=batch_size):
        start = time.perf_counter()
        with torch.inference_mode():
            reference = forward(loaded.model, batch.inputs, batch.attention_mask).logits
        torch_s += time.perf_counter() - start
        same_batching = reference
        if not exact:
            with torch.inference_mode():
                same_batching = forward(loaded.model, batch.inputs, batch.attention_mask, pad_audio=True).logits
        start = time.perf_counter()
        logits = onnx_logits(session, batch, kind)
        onnx_s += time.perf_counter() - start
        mask = frame_mask(loaded.model, batch.attention_mask, reference.shape[1])
        worst = max(worst, float(((logits - same_batching).abs() * mask[..., None]).max()))
        scale = max(scale, float((same_batching.abs() * mask[..., None]).max()))
        ours.update(zip(batch.utt_ids, decode_logits(loaded.model, loaded.tokenizer, reference, batch.attention_mask)))
        padded.update(zip(batch.utt_ids, decode_logits(loaded.model, loaded.tokenizer, same_batching,
                                                       batch.attention_mask)))
        theirs.update(zip(batch.utt_ids, decode_logits(loaded.model, loaded.tokenizer, logits, batch.attention_mask)))
        audio += float(batch.lengths.sum()) / int(loaded.feature_extractor.sampling_rate)
    ids = [u.utt_id for u in utts]
    reference = Transcription(ids, [u.text for u in utts], [ours[u] for u in ids], audio, torch_s)
    check = replace(_compare(reference, [theirs[u] for u in ids], worst, onnx_s), max_abs_logit=scale)
    if exact:
        return check
    same = replace(reference, hypotheses=[padded[u] for u in ids])
    return replace(check, same_transcripts=sum(padded[u] == theirs[u] for u in ids),
                   padded_batching_error_rate=same.score(check.unit).rate)


def _compare(reference, exported: list[str], max_diff: float | None, seconds: float) -> ExportCheck:
    """``reference`` (PyTorch's :class:`comflp.decode.Transcription`) against the export's transcripts of the
    same utterances, scored the same way."""
    from dataclasses import replace

    unit = guess_unit([r or "" for r in reference.references])
    theirs = replace(reference, hypotheses=list(exported), decode_seconds=seconds)
    return ExportCheck(utterances=len(exported),
                       same_transcripts=sum(a == b for a, b in zip(reference.hypotheses, exported)), unit=unit,
                       pytorch_error_rate=reference.score(unit).rate, export_error_rate=theirs.score(unit).rate,
                       max_logit_difference=max_diff, max_abs_logit=None, pytorch_seconds=reference.decode_seconds,
                       export_seconds=seconds)
