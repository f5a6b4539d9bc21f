"""``comflp measure-report``: which correlation measure predicts the CER of a pruned model, on your model."""

from __future__ import annotations

import argparse
import functools
import logging
import math
from pathlib import Path

from ..artifacts import (check_matrix_model, claim_file, is_matrix_set, load_matrices, load_matrix, log_of, plot_of,
                         report_output)
from ..errors import ComflpError, exit_on_error
from ..logs import setup_logging
from .argtypes import seed
from .options import (add_quiet, DEMO_DATA_HELP, ArgumentParser, corpus_split, add_dataset_arguments, add_device, add_prompt, add_threads, apply_threads,
                      resolve_prompt, add_front_end_cache, add_overwrite, add_pad_audio, positive_int,
                      read_corpus_or_dataset,
                      resolve_device)
from ..paths import DEMO_MODEL_DIR, exp_dir
from ..search import check_matrix
from ..strategy import check_prune_count

DEFAULT_NUM_STRATEGIES = 40

log = logging.getLogger("comflp.report")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="comflp measure-report",
        description="Rank correlations between every measure's coarse-search score and the real CER of sampled "
                    "strategies: which measure to trust on this model. Writes a JSON report, a PNG of one "
                    "scatter plot per measure, and prints a table (most negative Spearman rho = best predictor).")
    p.add_argument("--measure_file", action="append", required=True, metavar="[NAME=]PATH",
                   help="a matrix file: the .npz of `comflp measure` (every measure in it, named NAME:measure "
                        "when NAME= is given) or a paper .npy (named NAME, else its file stem). Repeat to compare "
                        "measurement settings, e.g. dc_bs4=dump/dc_mat_mean_bs4_iter10.npy "
                        "dc_bs32=dump/dc_mat_mean_bs32_iter10.npy, unbiased DC, --pool_padding")
    p.add_argument("--num_clip_layers", type=positive_int, default=6, help="K, layers pruned (default: %(default)s)")
    p.add_argument("--num_strategies", type=positive_int, default=None,
                   help="strategies decoded: the top 3 of every measure, then random ones, at most every strategy of "
                        "K layers (default: 40, or all of them when there are fewer, as for a 4-layer stack)")
    p.add_argument("--seed", type=seed, default=0, help="random strategies and bootstrap (default: %(default)s)")
    p.add_argument("--bootstrap", type=positive_int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default: %(default)s)")
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="the model the matrices were measured on "
                                                                 "(default: the demo model)")
    data_dir = p.add_argument("--verify_data_dir", type=Path, default=None,
                   help=f"labelled Kaldi dir (default: {DEMO_DATA_HELP.format(split='dev')})")
    p.add_argument("--test_num_batch", type=positive_int, default=10, help="(default: %(default)s)")
    p.add_argument("--verify_batch_size", type=positive_int, default=32,
                   help="the subset is the first test_num_batch x verify_batch_size utterances (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help="report JSON (default: exp/report/clip{L}to{L-K}_measures.json; the PNG beside it)")
    add_dataset_arguments(p, split="validation", replaces=[data_dir])
    add_pad_audio(p)
    add_front_end_cache(p)
    add_device(p)
    add_threads(p)
    add_prompt(p)
    add_overwrite(p, "report")
    add_quiet(p)
    return p


def _split_label(arg: str) -> tuple[str | None, Path]:
    label, sep, path = arg.partition("=")
    if sep and label and "/" not in label and not Path(arg).exists():
        return label, Path(path)
    return None, Path(arg)


def _entries(args: list[str]) -> dict[str, tuple[object, dict, Path]]:
    """name -> (matrix, metadata, file). Names: NAME[:measure] if labelled, else the measure (.npz) or the
    file stem (.npy); a name seen twice gets its file stem."""
    raw: list[tuple[str, object, dict, Path]] = []
    for arg in args:
        label, f = _split_label(arg)
        if is_matrix_set(f):
            mats, meta = load_matrices(f)
            raw += [(f"{label}:{name}" if label else name, m, meta, f) for name, m in mats.items()]
        else:
            m, meta = load_matrix(f)
            raw.append((label or f.stem, m, meta, f))
    counts: dict[str, int] = {}
    for name, *_ in raw:
        counts[name] = counts.get(name, 0) + 1
    out: dict[str, tuple[object, dict, Path]] = {}
    for name, m, meta, f in raw:
        key = name if counts[name] == 1 else f"{f.stem}:{name}"
        out[key] = (m, meta, f)
    return out


@exit_on_error
def main(argv: list[str] | None = None) -> Path:
    from ..model import fingerprint, load_model, num_layers
    from ..stages import measure_report
    from ..verify import FineSearch, verify_subset

    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    entries = _entries(args.measure_file)
    sizes = {m.shape for m, _, _ in entries.values()}
    if len(sizes) != 1:
        raise ComflpError(f"the matrices have different shapes {sorted(sizes)}: they come from different models")
    L = next(iter(sizes))[0] - 1
    K = args.num_clip_layers
    check_prune_count(L, K)
    total = math.comb(L, K)
    if args.num_strategies is None:
        args.num_strategies = min(DEFAULT_NUM_STRATEGIES, total)
    elif args.num_strategies > total:
        raise ComflpError(f"--num_strategies {args.num_strategies} exceeds the {total} strategies of {K} of {L} layers")
    out = Path(args.output or report_output(exp_dir(), L, K))
    png = plot_of(out)
    claim_file(out, overwrite=args.overwrite)
    claim_file(png, overwrite=args.overwrite)
    setup_logging(log_of(out))
    matrices = {}
    for name, (m, meta, f) in entries.items():
        matrices[name] = check_matrix(m, L, name=f"{f}:{name}")
        check_matrix_model(meta, num_layers=L, model=None, where=str(f))  # the depth; the model once loaded
    stacks = {meta.get("stack", "encoder") for _, meta, _ in entries.values()}
    if len(stacks) != 1:
        raise ComflpError(f"the matrices were measured on different layer stacks ({', '.join(sorted(stacks))})")
    stack = stacks.pop()
    loaded = load_model(args.model, device=resolve_device(args.device), need_tokenizer=True, need_ctc_head=True,
                        allow_encoder_decoder=True)
    content = functools.cache(lambda: fingerprint(loaded.model))  # computed once, if a path differs
    for name, (m, meta, f) in entries.items():
        check_matrix_model(meta, num_layers=L, model=args.model, where=str(f), fingerprint=content)
    if num_layers(loaded.model, stack) != L:
        raise ComflpError(f"the matrices are for {L} layers but {args.model}'s {stack} has "
                          f"{num_layers(loaded.model, stack)}")
    args.verify_data_dir = corpus_split(args.verify_data_dir, "dev", loaded, resolve_prompt(args))
    utts = verify_subset(read_corpus_or_dataset(args, args.verify_data_dir), args.test_num_batch, args.verify_batch_size)
    fine = FineSearch(loaded, utts, batch_size=args.verify_batch_size, progress=not args.quiet,
                      pad_audio=args.pad_audio, stack=stack, front_end_cache_gb=args.front_end_cache_gb,
                      prompt=resolve_prompt(args))
    settings = {"measure_files": list(args.measure_file), "model": str(args.model),
                "verify_data_dir": str(args.verify_data_dir), "pad_audio": args.pad_audio}
    measure_report(fine, matrices, K, num_strategies=args.num_strategies, seed=args.seed, bootstrap=args.bootstrap,
                   settings=settings, output=out, overwrite=args.overwrite)
    print(f"report: {out}")
    return out
