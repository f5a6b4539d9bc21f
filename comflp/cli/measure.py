"""Measure layer-by-layer correlation matrices of a model: ``comflp measure``, ``dc_analysis.py``,
``svcca_analysis.py``.

Multi-process: ``accelerate launch --multi_gpu --num_processes N dc_analysis.py ...`` (GPUs, or
gloo on a CPU-only machine) shards the batches over processes and all-reduces the statistics;
only process 0 writes files. (accelerate 1.x starts several ``--cpu`` processes only through MPI,
``--mpirun_hostfile``; without it ``--cpu --num_processes 2`` runs a single process.)
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..artifacts import (claim_file, dc_dump_name, heatmap_file, load_matrices, measure_log, measures_name,
                         source_id, svcca_dump_name)
from ..errors import ComflpError, exit_on_error
from ..hidden import ALL_MEASURES, MOMENT_MEMORY_GB, MeasureSettings
from ..logs import setup_logging
from ..model import load_model, num_layers
from ..heads import check_prompt
from .argtypes import open_unit_upper, seed
from .options import (add_quiet, DEMO_DATA_HELP, ArgumentParser, corpus_split, add_dataset_arguments, add_device, add_prompt, add_stack, add_threads, apply_threads, model_stack,
                      resolve_prompt, add_overwrite, add_pad_audio, check_num_layers, data_label, positive_float, positive_int,
                      read_corpus_or_dataset,
                      resolve_device)
from ..stages import Measured, measure as measure_stage
from ..paths import DEMO_MODEL_DIR, dump_dir, figure_dir

log = logging.getLogger("comflp.measure")


def add_common_arguments(p: argparse.ArgumentParser, *, batch_size: int, iter_num: int) -> None:
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model dir or hub id (default: the demo model)")
    data_dir = p.add_argument("--data_dir", type=Path, default=None,
                              help="Kaldi dir to measure on; transcripts not needed (default: "
                                   f"{DEMO_DATA_HELP.format(split='train')})")
    p.add_argument("--batch_size", type=positive_int, default=batch_size,
                   help="utterances per batch; per-batch measures (DC) are defined on batches of this size, so it may "
                        "not exceed the corpus. Memory grows with it: every layer's hidden states of one batch are "
                        "held at once, batch x frames x (L+1) x width floats (default: %(default)s)")
    p.add_argument("--iter_num", type=positive_int, default=iter_num, help="number of batches; utterances repeat (never within a batch) once the corpus is used up, at "
                        "most 100 passes over it (default: %(default)s)")
    p.add_argument("--accum_batch", type=positive_int, default=1,
                   help="micro-batches joined into one batch for per-batch measures (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=0, help="selects the utterances; same seed, same matrix (default: %(default)s)")
    p.add_argument("--use_pretrained", type=int, choices=[0, 1], default=1,
                   help="1: the model's trained weights; 0: a random initialisation of its config, a control (default: %(default)s)")
    p.add_argument("--num_layers", type=positive_int, default=None, help="expected number of layers; checked against the model")
    add_stack(p, default="encoder",
              help="the layer stack to measure: an encoder-decoder model (Whisper) has two; the encoder's "
                   "states are pooled over each utterance's real frames, the decoder's come under teacher "
                   "forcing on the transcripts (which --data_dir must then have) and are pooled over their "
                   "tokens; the matrix file name gets _decoder (default: %(default)s)")
    p.add_argument("--pool_padding", action="store_true",
                   help="average padded frames into the pooled vectors as the paper did (default: padding ignored)")
    add_pad_audio(p)
    add_device(p)
    add_overwrite(p, "matrix file or heatmap")
    add_threads(p)
    add_prompt(p)
    add_dataset_arguments(p, split="train", replaces=[data_dir])
    p.add_argument("--moment_memory_gb", type=positive_float, default=MOMENT_MEMORY_GB,
                   help="memory for the second moment of SVCCA/PWCCA/CKA, (L+1)D x (L+1)D float64; when it does not "
                        "fit, the moment is built one band of layers per pass over the same utterances (same "
                        "matrices, more passes); the later passes reuse the first pass's samples when they fit in "
                        "this budget too, so the process holds at most twice it (default: %(default)s)")
    p.add_argument("--dump_dir", type=Path, default=dump_dir(), help="where matrices go (default: %(default)s)")
    p.add_argument("--figure_dir", type=Path, default=figure_dir(), help="where heatmaps go (default: %(default)s)")
    p.add_argument("--no_plot", action="store_true", help="skip the heatmap PNGs")
    add_quiet(p, "no progress bar")


def _accelerator():
    """An accelerate.Accelerator when launched with several processes, else None.

    Without CUDA the processes talk over gloo on the CPU: ``cpu=True`` is what
    makes accelerate treat a torchrun-style launch (``accelerate launch
    --multi_gpu``) on a CPU-only machine as MULTI_CPU rather than one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "True")
    return None


def run(args: argparse.Namespace, settings: MeasureSettings) -> Measured | None:
    """Load, measure, return the stage's result on process 0 (None on the others); its record names the model
    as the user gave it and what the command adds (the random-initialisation control, processes, prompt)."""
    settings.validate()
    apply_threads(args.threads)
    accelerator = _accelerator()
    is_main = accelerator is None or accelerator.is_main_process
    setup_logging(measure_log(args.dump_dir) if is_main else None)
    device = accelerator.device if accelerator else resolve_device(args.device)
    decoder = args.stack == "decoder"
    loaded = load_model(args.model, device=device, allow_encoder_decoder=True, need_tokenizer=decoder)
    args.data_dir = corpus_split(args.data_dir, "train", loaded, resolve_prompt(args))
    utts = read_corpus_or_dataset(args, args.data_dir, require_text=decoder)
    model_stack(args, loaded.model)  # the name given is one of the model's
    check_num_layers(args.num_layers, num_layers(loaded.model, args.stack), args.model)
    if not args.use_pretrained:  # the control: a random initialisation of the same config
        torch.manual_seed(settings.seed)
        loaded = replace(loaded, model=type(loaded.model)(loaded.model.config).eval().to(device))
    prompt = resolve_prompt(args)
    check_prompt(loaded.model, prompt)  # a CTC model has no prompt: refused rather than ignored
    try:
        measured = measure_stage(loaded, utts, settings, stack=args.stack, data=data_label(args, args.data_dir),
                                 accelerator=accelerator, progress=not args.quiet,
                                 moment_memory_gb=args.moment_memory_gb, prompt=prompt)
    finally:
        if accelerator is not None:  # close the processes' group so that its threads end before the interpreter
            accelerator.end_training()  # does (left to exit, gloo can abort: "terminate called without ...")
    if not is_main:
        return None
    measured = replace(measured, model=source_id(args.model), record={
        "use_pretrained": bool(args.use_pretrained), "processes": accelerator.num_processes if accelerator else 1,
        **({"prompt": prompt.to_dict()} if prompt.language or prompt.task or prompt.instruction else {})})
    log.info("measured %s on %d utterances (%d frames) in %.1f s", ",".join(settings.measures),
             measured.stats.num_utterances, measured.stats.num_frames, measured.seconds)
    return measured


def _heatmap_paths(args: argparse.Namespace, matrix_file: Path, measures: list[str | None]) -> list[Path]:
    if args.no_plot:
        return []
    return [claim_file(heatmap_file(args.figure_dir, matrix_file, m), overwrite=args.overwrite, flag="--figure_dir")
            for m in measures]


def _plot(matrix: np.ndarray, path: Path, title: str) -> None:
    from ..plots import heatmap

    heatmap(matrix, path, title=title)
    log.info("heatmap -> %s", path)


def _write_paper_matrix(measured: Measured, measure: str, args: argparse.Namespace, name: str, title: str) -> Path:
    path = measured.save(Path(args.dump_dir) / name, measure, overwrite=args.overwrite)
    log.info("matrix -> %s", path)
    for png in _heatmap_paths(args, path, [None]):
        _plot(measured.matrices[measure], png, title)
    return path


def _check_outputs(args: argparse.Namespace, outputs: list[Path]) -> None:
    """Refuse before measuring (minutes of work) if an output may not be written."""
    for out in outputs:
        claim_file(out, overwrite=args.overwrite)
    for out in outputs:
        _heatmap_paths(args, out, [None])


def dc_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python dc_analysis.py",
                                description="Distance-correlation matrix of hidden states 0..L (the paper's DC). "
                                            "Writes dump/dc_mat_{mode}_bs{bs*accum}_iter{iter}.npy and a heatmap.")
    add_common_arguments(p, batch_size=4, iter_num=10)
    p.add_argument("--mode", choices=["mean", "seq"], default="mean",
                   help="mean: time-pooled vectors (paper); seq: frame sequences cut to the batch's shortest and "
                        "flattened (default: %(default)s)")
    p.add_argument("--unbiased", action="store_true",
                   help="U-centred (unbiased) estimator; the biased one is inflated on small batches. "
                        "The file name gets a _unbiased suffix")
    return p


@exit_on_error
def dc_main(argv: list[str] | None = None) -> None:
    args = dc_parser().parse_args(argv)
    measure = "dc_unbiased" if args.unbiased else "dc"
    settings = MeasureSettings(measures=(measure,), batch_size=args.batch_size, iter_num=args.iter_num,
                               accum_batch=args.accum_batch, dc_mode=args.mode, seed=args.seed,
                               pool_padding=args.pool_padding, pad_audio=args.pad_audio)
    name = dc_dump_name(args.mode, args.batch_size, args.iter_num, args.accum_batch, unbiased=args.unbiased,
                        stack=args.stack)
    _check_outputs(args, [Path(args.dump_dir) / name])
    measured = run(args, settings)
    if measured is None:
        return
    path = _write_paper_matrix(measured, measure, args, name, f"DC ({args.mode}, {measure})")
    print(path)


def svcca_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python svcca_analysis.py",
                                description="SVCCA matrix of hidden states 0..L (the paper's SVCCA), streamed. "
                                            "Writes dump/cca_mat_{bs*iter}{mode}_svthre{thre}.npy and a heatmap.")
    add_common_arguments(p, batch_size=32, iter_num=300)
    p.add_argument("--thre", type=open_unit_upper, default=0.99,
                   help="keep top singular directions whose singular values sum past this fraction (default: %(default)s)")
    p.add_argument("--mode", choices=["U", "T"], default="U",
                   help="U: one time-pooled vector per utterance; T: every frame a sample (default: %(default)s)")
    return p


@exit_on_error
def svcca_main(argv: list[str] | None = None) -> None:
    args = svcca_parser().parse_args(argv)
    settings = MeasureSettings(measures=("svcca",), batch_size=args.batch_size, iter_num=args.iter_num,
                               accum_batch=args.accum_batch, sample_mode=args.mode, thre=args.thre, seed=args.seed,
                               pool_padding=args.pool_padding, pad_audio=args.pad_audio)
    name = svcca_dump_name(args.batch_size, args.iter_num, args.mode, args.thre, stack=args.stack)
    _check_outputs(args, [Path(args.dump_dir) / name])
    measured = run(args, settings)
    if measured is None:
        return
    path = _write_paper_matrix(measured, "svcca", args, name, f"SVCCA ({args.mode}, thre {args.thre})")
    print(path)


def measure_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="comflp measure",
                                description="Several correlation matrices from one streamed pass, saved together "
                                            "in one .npz with the settings. Measures: " + ", ".join(ALL_MEASURES))
    add_common_arguments(p, batch_size=8, iter_num=25)
    p.add_argument("--measures", default="cosine,dc,svcca,cka",
                   help="comma-separated; cosine (the default of `comflp search`) first (default: %(default)s)")
    p.add_argument("--mode", choices=["mean", "seq"], default="mean", help="DC/unbiased-CKA vectors (default: %(default)s)")
    p.add_argument("--svcca_mode", choices=["U", "T"], default="U",
                   help="samples of svcca/pwcca/cka/cosine/angular: utterances or frames (default: %(default)s)")
    p.add_argument("--thre", type=open_unit_upper, default=0.99, help="SVCCA threshold (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help="the .npz (default: <dump_dir>/measures_bs{bs}_iter{iter}_{svcca_mode}.npz)")
    return p


@exit_on_error
def measure_main(argv: list[str] | None = None) -> None:
    args = measure_parser().parse_args(argv)
    names = tuple(m.strip() for m in args.measures.split(",") if m.strip())
    if not names:
        raise ComflpError(f"--measures {args.measures!r} names no measure; choose from {', '.join(ALL_MEASURES)}")
    if len(set(names)) != len(names):
        raise ComflpError(f"--measures {args.measures!r} names a measure twice")
    settings = MeasureSettings(measures=names, batch_size=args.batch_size, iter_num=args.iter_num,
                               accum_batch=args.accum_batch, dc_mode=args.mode, sample_mode=args.svcca_mode,
                               thre=args.thre, seed=args.seed, pool_padding=args.pool_padding,
                               pad_audio=args.pad_audio)
    settings.validate()
    out = Path(args.output or Path(args.dump_dir) / measures_name(args.batch_size, args.iter_num, args.svcca_mode,
                                                                        stack=args.stack))
    claim_file(out, overwrite=args.overwrite)
    pngs = _heatmap_paths(args, out, list(names))
    measured = run(args, settings)
    if measured is None:
        return
    measured.save(out, overwrite=args.overwrite)
    for (name, m), png in zip(measured.matrices.items(), pngs):
        _plot(m, png, name)
    log.info("matrices %s -> %s", ",".join(measured.matrices), out)
    print(out)


def load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a ``comflp measure`` file: (matrices by name, metadata)."""
    return load_matrices(path)


main = measure_main
