"""Decode a labelled corpus with a CTC or Whisper model: CER/WER over the whole set, real-time factor, parameters.

Writes ``test_asr.log`` and ``test_asr.json`` to the output dir.
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

from . import atomic
from .artifacts import ExperimentDir, claim_file, open_output_dir, output_lock
from .errors import ComflpError, exit_on_error
from .logs import setup_logging
from .options import (ArgumentParser, add_dataset_arguments, add_device, add_overwrite, add_pad_audio, add_threads, apply_threads, positive_int, read_corpus_or_dataset,
                      resolve_device)
from .model import load_model
from .paths import DEMO_MODEL_DIR, EXP_DIR, demo_split
from .stages import score

log = logging.getLogger("comflp.test")



def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python test_asr.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model dir or hub id; default: <output_dir>/model_avg when --output_dir is given "
                        "(the paper's usage; it must exist), else the demo model")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="where test_asr.log and test_asr.json go (default: exp/test_<model name>)")
    p.add_argument("--data_dir", type=Path, default=demo_split("test"),
                   help="Kaldi dir to decode (default: the embedded corpus's test split)")
    p.add_argument("--batch_size", type=positive_int, default=16,
                   help="utterances per batch; does not change the transcripts (default: %(default)s)")
    p.add_argument("--unit", choices=["auto", "char", "word"], default="auto",
                   help="score characters (CER) or words (WER); auto = char for CJK text (default: %(default)s)")
    add_device(p)
    add_threads(p)
    add_dataset_arguments(p, split="test", replaces="--data_dir")
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
    out_dir = Path(args.output_dir or EXP_DIR / f"test_{Path(model_src).name}")
    report = ExperimentDir(out_dir).test_report
    open_output_dir(out_dir, kind="test")  # refuses a file, or a dir comflp did not write, before anything else
    claim_file(report, overwrite=args.overwrite, flag="test report")
    with output_lock(report):
        return _test(args, model_src, out_dir, report, device)


def _test(args: argparse.Namespace, model_src: str, out_dir: Path, report: Path, device) -> dict:
    setup_logging(out_dir / "test_asr.log")
    loaded = load_model(model_src, device=device, need_tokenizer=True, need_ctc_head=True, allow_encoder_decoder=True)
    utts = read_corpus_or_dataset(args, args.data_dir)
    scored = score(loaded, utts, batch_size=args.batch_size, unit=None if args.unit == "auto" else args.unit,
                   device=device, progress=True, pad_audio=args.pad_audio)
    result, unit, er = scored.transcription, scored.unit, scored.error_rate
    name = "CER" if unit == "char" else "WER"
    summary = {
        "model": model_src,
        "data_dir": f"{args.dataset} [{args.dataset_split}]" if args.dataset else str(args.data_dir), "num_utterances": len(utts), "unit": unit,
        "error_rate": er.rate, "substitutions": er.substitutions, "deletions": er.deletions,
        "insertions": er.insertions, "num_ref_tokens": er.num_ref_tokens,
        "audio_seconds": result.audio_seconds, "decode_seconds": result.decode_seconds,
        "rtf": scored.rtf, "num_parameters": scored.num_parameters, "num_layers": scored.num_layers, "device": str(device), "batch_size": args.batch_size,
        "pad_audio": args.pad_audio,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
    }
    for utt, ref, hyp in zip(result.utt_ids, result.references, result.hypotheses):
        logging.getLogger("comflp.test.hyp").debug("%s ref=%s hyp=%s", utt, ref, hyp)
    atomic.write_json(report, summary)
    atomic.write_text(out_dir / "hyp.txt", "".join(f"{u} {h}\n" for u, h in zip(result.utt_ids, result.hypotheses)))
    log.info("%s %.2f%% on %d utterances (%s); RTF %.4f; %d layers, %s parameters",
             name, 100 * er.rate, len(utts), args.data_dir, summary["rtf"], summary["num_layers"],
             f"{summary['num_parameters']:,}")
    return summary


if __name__ == "__main__":
    main()
