"""Decode a labelled corpus with a CTC model: CER/WER over the whole set, real-time factor, parameters.

Writes ``test_asr.log`` and ``test_asr.json`` to the output dir.
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

from . import atomic
from .average import AVERAGED_MODEL
from .data import read_corpus_dir
from .decode import transcribe
from .errors import exit_on_error
from .logs import setup_logging
from .metrics import guess_unit
from .model import count_parameters, load_model, num_layers
from .paths import DEMO_MODEL_DIR, EXP_DIR, demo_split

log = logging.getLogger("comflp.test")



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python test_asr.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model dir or hub id; default: <output_dir>/model_avg if it exists, else the demo model")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="where test_asr.log and test_asr.json go (default: exp/test_<model name>)")
    p.add_argument("--data_dir", type=Path, default=demo_split("test"),
                   help="Kaldi dir to decode (default: the embedded corpus's test split)")
    p.add_argument("--batch_size", type=int, default=16, help="utterances per batch (default: %(default)s)")
    p.add_argument("--unit", choices=["auto", "char", "word"], default="auto",
                   help="score characters (CER) or words (WER); auto = char for CJK text (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_src = args.model
    if model_src is None:
        avg = args.output_dir / AVERAGED_MODEL if args.output_dir else None
        model_src = str(avg) if avg is not None and avg.is_dir() else str(DEMO_MODEL_DIR)
    out_dir = args.output_dir or EXP_DIR / f"test_{Path(model_src).name}"
    setup_logging(out_dir / "test_asr.log")
    loaded = load_model(model_src, device=args.device, need_tokenizer=True)
    utts = read_corpus_dir(args.data_dir)
    result = transcribe(loaded.model, loaded.feature_extractor, loaded.tokenizer, utts, batch_size=args.batch_size,
                        device=args.device, progress=True)
    unit = guess_unit([u.text for u in utts]) if args.unit == "auto" else args.unit
    er = result.score(unit)
    name = "CER" if unit == "char" else "WER"
    summary = {
        "model": model_src, "data_dir": str(args.data_dir), "num_utterances": len(utts), "unit": unit,
        "error_rate": er.rate, "substitutions": er.substitutions, "deletions": er.deletions,
        "insertions": er.insertions, "num_ref_tokens": er.num_ref_tokens,
        "audio_seconds": result.audio_seconds, "decode_seconds": result.decode_seconds,
        "rtf": result.decode_seconds / result.audio_seconds, "num_parameters": count_parameters(loaded.model),
        "num_layers": num_layers(loaded.model), "device": str(args.device), "batch_size": args.batch_size,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
    }
    for utt, ref, hyp in zip(result.utt_ids, result.references, result.hypotheses):
        logging.getLogger("comflp.test.hyp").debug("%s ref=%s hyp=%s", utt, ref, hyp)
    atomic.write_json(out_dir / "test_asr.json", summary)
    atomic.write_text(out_dir / "hyp.txt", "".join(f"{u} {h}\n" for u, h in zip(result.utt_ids, result.hypotheses)))
    log.info("%s %.2f%% on %d utterances (%s); RTF %.4f; %d layers, %s parameters",
             name, 100 * er.rate, len(utts), args.data_dir, summary["rtf"], summary["num_layers"],
             f"{summary['num_parameters']:,}")
    return summary


if __name__ == "__main__":
    main()
