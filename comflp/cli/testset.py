"""Decode a labelled corpus with a CTC, encoder-decoder (Whisper, Moonshine) or speech-LLM model: CER/WER over
the whole set, real-time factor, parameters.

Writes ``test_asr.log`` and ``test_asr.json`` to the output dir.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..artifacts import ExperimentDir, check_output_dir, claim_file, open_output_dir, test_output
from ..errors import ComflpError, exit_on_error
from ..logs import setup_logging
from .options import (DEMO_DATA_HELP, ArgumentParser, add_prompt, corpus_split, resolve_prompt, add_dataset_arguments, add_device, add_overwrite, add_pad_audio, add_threads, apply_threads, data_label, positive_int, read_corpus_or_dataset,
                      resolve_device)
from ..model import load_model
from ..heads import check_prompt
from ..paths import DEMO_MODEL_DIR, exp_dir
from ..stages import evaluate

log = logging.getLogger("comflp.test")



def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python test_asr.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model dir or hub id; default: <output_dir>/model_avg when --output_dir is given "
                        "(the paper's usage; it must exist), else the demo model")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="where test_asr.log and test_asr.json go (default: exp/test_<model name>)")
    data_dir = p.add_argument("--data_dir", type=Path, default=None,
                              help=f"Kaldi dir to decode (default: {DEMO_DATA_HELP.format(split='test')})")
    p.add_argument("--batch_size", type=positive_int, default=16,
                   help="utterances per batch; does not change the transcripts, only speed and memory (which grows with "
                        "the batch times its longest utterance) (default: %(default)s)")
    p.add_argument("--unit", choices=["auto", "char", "word"], default="auto",
                   help="score characters (CER) or words (WER); auto = char for CJK text (default: %(default)s)")
    add_device(p)
    add_threads(p)
    add_prompt(p)
    add_dataset_arguments(p, split="test", replaces=[data_dir])
    add_pad_audio(p)
    add_overwrite(p, "test report (test_asr.json, hyp.txt)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    model_src = args.model
    if model_src is None:
        if args.output_dir is not None:
            avg = ExperimentDir(args.output_dir).averaged
            if not avg.is_dir():
                raise ComflpError(f"{avg} not found: average the checkpoints first (average_model_pts.py --exp_dir "
                                  f"{args.output_dir}) or pass --model")
            model_src = str(avg)
        else:
            model_src = str(DEMO_MODEL_DIR)
    out_dir = Path(args.output_dir or test_output(exp_dir(), model_src))
    report = ExperimentDir(out_dir).test_report
    check_output_dir(out_dir)  # refuses a file, or a dir comflp did not write, before anything else
    claim_file(report, overwrite=args.overwrite, flag="test report")
    return _test(args, model_src, out_dir, device)


def _test(args: argparse.Namespace, model_src: str, out_dir: Path, device) -> dict:
    loaded = load_model(model_src, device=device, need_tokenizer=True, need_ctc_head=True, allow_encoder_decoder=True)
    check_prompt(loaded.model, resolve_prompt(args))
    args.data_dir = corpus_split(args.data_dir, "test", loaded, resolve_prompt(args))
    utts = read_corpus_or_dataset(args, args.data_dir)
    # the dir is made (and logged to) once the model and the corpus have passed their checks: a refused
    # command writes nothing
    open_output_dir(out_dir, kind="test")
    setup_logging(ExperimentDir(out_dir).command_log("test_asr"))
    tested = evaluate(loaded, utts, out_dir, data=data_label(args, args.data_dir), batch_size=args.batch_size,
                  unit=None if args.unit == "auto" else args.unit, device=device, progress=True,
                  pad_audio=args.pad_audio, overwrite=args.overwrite, prompt=resolve_prompt(args))
    return tested.summary


if __name__ == "__main__":
    main()
