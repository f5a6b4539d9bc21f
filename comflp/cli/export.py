"""Export a (pruned) model for the runtimes people deploy with, checked against PyTorch.

Whisper goes to CTranslate2 (what faster-whisper loads), CTC models to ONNX (ONNX Runtime). The export is
written only after it has transcribed the check utterances as PyTorch does (unquantised) or with its error
rate change reported (quantised); ``comflp_export.json`` in the output dir records the check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import exit_on_error
from ..paths import DEMO_MODEL_DIR
from .argtypes import non_negative_int, positive_int
from .options import (DEMO_DATA_HELP, ArgumentParser, add_overwrite, add_prompt, add_threads, apply_threads,
                      command_line, corpus_split, resolve_prompt)
from ..demo.corpus import read_corpus


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="comflp export", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model dir or hub id (default: the demo model)")
    p.add_argument("--format", choices=["auto", "ct2", "onnx"], default="auto",
                   help="ct2: CTranslate2, for Whisper (faster-whisper loads it); onnx: ONNX with dynamic batch and "
                        "time axes and the attention mask as an input, for CTC models; auto: the one the model "
                        "takes (default: %(default)s)")
    p.add_argument("--output", type=Path, required=True,
                   help="output dir; must not exist, or be empty, or be an earlier comflp output with --overwrite")
    p.add_argument("--quantization", choices=["none", "int8", "float16"], default="none",
                   help="weights stored as int8 (ct2, onnx: ONNX Runtime's dynamic quantisation) or float16 (ct2 "
                        "only); the check then reports the error rate change instead of requiring equal "
                        "transcripts (default: %(default)s)")
    p.add_argument("--check_data_dir", type=Path, default=None,
                   help=f"Kaldi dir whose first --check_utts utterances check the export (default: "
                        f"{DEMO_DATA_HELP.format(split='test')})")
    p.add_argument("--check_utts", type=non_negative_int, default=40,
                   help="utterances to check on; 0 writes the export unchecked, which is not recommended "
                        "(default: %(default)s)")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="utterances per batch when checking; the transcripts do not depend on it "
                        "(default: %(default)s)")
    add_prompt(p)
    add_threads(p)
    add_overwrite(p, "export dir")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from ..artifacts import claim_dir, source_id
    from ..export import check_format, export
    from ..heads import head_of
    from ..model import load_model
    from ..heads import check_prompt

    parser = build_parser()
    args = parser.parse_args(argv)
    claim_dir(args.output, overwrite=args.overwrite)  # before the slow part
    apply_threads(args.threads)
    loaded = load_model(args.model, need_tokenizer=True, need_ctc_head=True, allow_encoder_decoder=True)
    fmt = args.format if args.format != "auto" else head_of(loaded.model).export_format
    check_format(loaded.model, fmt, args.quantization, loaded.tokenizer)
    prompt = check_prompt(loaded.model, resolve_prompt(args))
    utts, data = [], ""
    if args.check_utts:
        data_dir = corpus_split(args.check_data_dir, "test", loaded, prompt)
        utts = read_corpus(data_dir)[: args.check_utts]
        data = source_id(data_dir)
    out = export(loaded, args.output, fmt=fmt, quantization=args.quantization, check_utts=utts,
                 batch_size=args.batch_size, overwrite=args.overwrite, data=data, prompt=prompt,
                 command=command_line(parser, argv))
    check = out.check
    name = "CER" if check is None or check.unit == "char" else "WER"
    if check is not None:
        diff = (f"; logits within {check.max_logit_difference:.1e}" if check.max_logit_difference is not None
                else "")
        print(f"checked on {check.utterances} utterances: {check.same_transcripts} transcripts as PyTorch's{diff}; "
              f"{name} {100 * check.pytorch_error_rate:.2f}% (PyTorch) -> {100 * check.export_error_rate:.2f}% "
              f"({fmt}{'' if args.quantization == 'none' else ' ' + args.quantization})")
    if not out.exact_batching:
        moved = (f" ({name} {100 * check.padded_batching_error_rate:.2f}% on these batches of {args.batch_size}, "
                 f"{100 * check.pytorch_error_rate:.2f}% batch-invariant)" if check is not None else "")
        print(f"note: {loaded.model.config.model_type} reads padding where an ONNX graph cannot mask it: the graph "
              f"gives the paper's padded batching{moved}; one utterance per run is exact")
    print(f"exported {args.model} ({fmt}) to {args.output}")
