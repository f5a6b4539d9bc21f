"""Coarse + fine search front-ends: ``comflp search`` / ``search_strategy/search_prune_then_verify_mix.py``
and ``comflp glp`` / ``search_strategy/wer_based_greedy_search.py``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from ..artifacts import (check_matrix_model, claim_file, dc_dump_name, glp_log_name, glp_output, is_matrix_set,
                         load_matrices, load_matrix, matrix_set_files, paper_search_log_name, search_output,
                         svcca_dump_name)
from ..errors import ComflpError, exit_on_error
from .argtypes import confidence, open_unit_upper, seed
from .options import (add_quiet, DEMO_DATA_HELP, ArgumentParser, corpus_split, add_dataset_arguments, add_device, add_prompt, add_repair, add_stack, add_threads, apply_threads, model_stack,
                      resolve_prompt, add_front_end_cache, add_overwrite, add_pad_audio, check_num_layers, fit_repair_from_flags, positive_int, read_corpus_or_dataset,
                      resolve_device, str2bool)
from ..logs import setup_logging
from ..paths import DEMO_MODEL_DIR, dump_dir, exp_dir, search_log_dir
from ..search import SEARCH_MODES, check_matrix, coarse
from ..strategy import Candidate, StrategyFile, check_prune_count

log = logging.getLogger("comflp.search")

MEASURES = ("dc", "svcca", "dc_unbiased", "pwcca", "cka", "cka_unbiased", "cosine", "angular", "rand", "linspace")
BASELINES = ("rand", "linspace")  # strategies chosen without the matrix, scored on its DC entry (else its first)


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model dir or hub id (default: the demo model)")
    data_dir = p.add_argument("--verify_data_dir", type=Path, default=None,
                   help=f"labelled Kaldi dir for fine search (default: {DEMO_DATA_HELP.format(split='dev')}; "
                        "the paper verified on its test set)")
    p.add_argument("--test_num_batch", type=positive_int, default=10,
                   help="batches in the fine-search subset (default: %(default)s)")
    p.add_argument("--verify_batch_size", type=positive_int, default=32,
                   help="utterances per batch; the subset is the first test_num_batch x verify_batch_size "
                        "utterances in wav.scp order; how they are batched does not change the CERs, only speed "
                        "and memory (which grows with the batch times its longest utterance) (default: %(default)s)")
    add_dataset_arguments(p, split="validation", replaces=[data_dir])
    add_pad_audio(p)
    add_front_end_cache(p)
    add_device(p)
    add_threads(p)
    add_prompt(p)
    add_overwrite(p, "strategy file")
    p.add_argument("--log_dir", type=Path, default=search_log_dir(), help="where the paper-style log goes (default: %(default)s)")
    add_quiet(p)


PAPER_MEASURE = "dc"
# `comflp measure-report` on demo-12l (40 strategies, 12 -> 6): cosine rho -0.90 [-0.96, -0.80] against the
# paper's DC at batch 4 rho -0.63 [-0.72, -0.45] and at batch 32 rho -0.35 (README, "Which measure to trust")
EVIDENCE_MEASURE = "cosine"


def search_parser(*, default_measure: str = PAPER_MEASURE,
                  prog: str = "python search_strategy/search_prune_then_verify_mix.py") -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description="Coarse search on a correlation matrix, then fine search (CER of the top candidates on a "
                    "labelled subset). Writes a strategy JSON, best first.")
    p.add_argument("--num_layers", type=positive_int, default=12, help="layers of the model (default: %(default)s)")
    p.add_argument("--num_clip_layers", type=positive_int, default=6, help="K, layers to prune (default: %(default)s)")
    p.add_argument("--search_mode", choices=SEARCH_MODES, default="exhaustive", help="(default: %(default)s)")
    p.add_argument("--select_measure", choices=MEASURES, default=default_measure,
                   help="which matrix scores the strategies; baselines: rand draws random strategies, linspace keeps "
                        "evenly spaced layers, the first and last always (distil-whisper's choice), both scored on "
                        "the DC matrix (of an .npz without dc: its first). "
                        "The paper's script defaults to the paper's dc; `comflp search` defaults to cosine, the "
                        "best predictor of CER in `comflp measure-report` on the demo model (Spearman -0.90 "
                        "against -0.63 for DC at batch 4): run `comflp measure-report` to check on your model "
                        "(default: %(default)s)")
    p.add_argument("--topk_num", type=positive_int, default=10,
                   help="candidates kept by exhaustive/exact/rand (default: %(default)s)")
    p.add_argument("--beam_size", type=positive_int, default=10, help="beam width (default: %(default)s)")
    add_stack(p, default=None,
              help="the layer stack the strategies prune (encoder-decoder models); checked against the stack "
                   "the matrix was measured on, and written to the strategy JSON (default: the matrix's)")
    p.add_argument("--coarse_search_only", type=str2bool, default=False, help="skip the fine search (default: %(default)s)")
    p.add_argument("--verify_wer", type=str2bool, default=True, help="measure CER/WER of the candidates (default: %(default)s)")
    p.add_argument("--bs", type=positive_int, default=32, help="batch size in the DC/SVCCA dump name (default: %(default)s)")
    p.add_argument("--iter", type=positive_int, default=10, help="iterations in the DC/SVCCA dump name (default: %(default)s)")
    p.add_argument("--mode", default="mean", help="DC mode in the dump name (default: %(default)s)")
    p.add_argument("--svcca_mode", default="U", help="SVCCA mode in the dump name (default: %(default)s)")
    p.add_argument("--thre", type=open_unit_upper, default=0.99, help="SVCCA threshold in the dump name (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=42,
                   help="seed of the rand baseline and of the race's utterance order (default: %(default)s)")
    p.add_argument("--race", type=str2bool, default=True,
                   help="racing fine search: decode the candidates on growing chunks of the subset and drop one "
                        "once it is worse than the leader with --race_confidence (paired bootstrap over "
                        "utterances); survivors are decoded on the whole subset, so the pick is full evaluation's "
                        "unless a drop was wrong (it picked full evaluation's on demo-12l and demo-24l); "
                        "false decodes every candidate on the whole subset, as the paper (default: %(default)s)")
    p.add_argument("--race_confidence", type=confidence, default=None,
                   help="one-sided confidence of a drop in the race, in [0.5, 1) (default: "
                        "comflp.verify.RACE_CONFIDENCE, 0.99)")
    p.add_argument("--measure_file", type=Path, default=None,
                   help="use this matrix (.npy, or .npz from `comflp measure`: the --select_measure entry) "
                        "instead of the dump file the paper's flags name")
    p.add_argument("--output", type=Path, default=None,
                   help="strategy JSON (default: exp/search/clip{L}to{L-K}_{measure}_{mode}.json)")
    add_verify_arguments(p)
    add_repair(p, ranking=True)
    return p


def locate_matrix(args: argparse.Namespace) -> tuple[np.ndarray, dict, Path]:
    """The matrix the flags name and its metadata, found as the paper does (dump/ under the repository root)."""
    measure = "dc" if args.select_measure in BASELINES else args.select_measure
    if args.measure_file is not None:
        path = Path(args.measure_file)
        if not path.is_file():
            raise ComflpError(f"--measure_file not found: {path}")
        if args.select_measure in BASELINES and is_matrix_set(path):
            mats, _ = load_matrices(path)
            measure = measure if measure in mats else next(iter(mats))
        matrix, meta = load_matrix(path, measure)
        return matrix, meta, path
    if measure == "dc":
        path = dump_dir() / dc_dump_name(args.mode, args.bs, args.iter)
        flags = f"--select_measure {args.select_measure} --mode {args.mode} --bs {args.bs} --iter {args.iter}"
        make = f"python dc_analysis.py --batch_size {args.bs} --iter_num {args.iter} --mode {args.mode}"
    elif measure == "svcca":
        path = dump_dir() / svcca_dump_name(args.bs, args.iter, args.svcca_mode, args.thre)
        flags = f"--select_measure svcca --bs {args.bs} --iter {args.iter} --svcca_mode {args.svcca_mode} --thre {args.thre}"
        make = (f"python svcca_analysis.py --batch_size {args.bs} --iter_num {args.iter} --mode {args.svcca_mode} "
                f"--thre {args.thre}")
    else:
        return _find_measures_file(measure)
    if not path.is_file():
        raise ComflpError(f"matrix file not found: {path} (named by {flags}); make it with `{make}` "
                          f"or pass --measure_file")
    matrix, meta = load_matrix(path)
    return matrix, meta, path


def _find_measures_file(measure: str) -> tuple[np.ndarray, dict, Path]:
    """The one ``comflp measure`` file under dump/ that holds ``measure`` (measures without a paper file name)."""
    found = []
    for f in matrix_set_files(dump_dir()):
        try:
            mats, meta = load_matrices(f)
        except ComflpError:
            continue
        if measure in mats:
            found.append((mats[measure], meta, f))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ComflpError(f"no matrix for --select_measure {measure} under {dump_dir()}: make one with "
                          f"`comflp measure --measures {measure}` or pass --measure_file")
    raise ComflpError(f"{len(found)} files under {dump_dir()} hold {measure} ({', '.join(f.name for *_, f in found)}): "
                      "choose one with --measure_file")


def _table(cands: list[Candidate], rate: str = "CER") -> str:
    """The candidates as a table; ``rate``: what their error rate is (CER, or WER for text in words)."""
    rows = [f"{'rank':>4}  {'score':>10}  {rate:>8}  blocks"]
    for i, c in enumerate(cands, 1):
        cer = f"{100 * c.cer:7.2f}%" if c.cer is not None else f"{'-':>8}"
        sc = f"{c.score:10.6f}" if c.score is not None else f"{'-':>10}"
        rows.append(f"{i:>4}  {sc}  {cer}  {[list(b) for b in c.blocks]}")
    return "\n".join(rows)


def _fine_search(args: argparse.Namespace, stack: str = "encoder"):
    from ..model import load_model, num_layers
    from ..verify import FineSearch, verify_subset

    apply_threads(args.threads)
    loaded = load_model(args.model, device=resolve_device(args.device), need_tokenizer=True, need_ctc_head=True,
                        allow_encoder_decoder=True)
    if args.stack_name is not None:  # the name given must be one of the model's (a speech-LLM's llm, ...)
        stack = model_stack(args, loaded.model)
    check_num_layers(args.num_layers, num_layers(loaded.model, stack), args.model)
    args.verify_data_dir = corpus_split(args.verify_data_dir, "dev", loaded, resolve_prompt(args))
    utts = verify_subset(read_corpus_or_dataset(args, args.verify_data_dir), args.test_num_batch, args.verify_batch_size)
    return FineSearch(loaded, utts, batch_size=args.verify_batch_size, progress=not args.quiet,
                      pad_audio=args.pad_audio, stack=stack, front_end_cache_gb=args.front_end_cache_gb,
                      prompt=resolve_prompt(args))


def _expressible(model_dir, stack: str):
    """The layer sets ``model_dir``'s model can prune from ``stack``, as a predicate (a Granite Speech model
    refuses some, :func:`comflp.model.layers.expressible`), read from its config alone; None when it refuses none
    or has no config here (a coarse-only search from a matrix). transformers is imported only for a family that
    refuses sets."""
    import json

    from ..model.families import FAMILIES

    config_file = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # not a model directory here: the fine search, if any, names the problem
    family = FAMILIES.get(model_type)
    stacks = family.stacks if family is not None else {}
    if stack not in stacks or not stacks[stack].refuses_sets:
        return None
    from types import SimpleNamespace

    from transformers import AutoConfig

    from ..model.layers import expressible

    return expressible(SimpleNamespace(config=AutoConfig.from_pretrained(model_dir)), stack)


@exit_on_error
def search_main(argv: list[str] | None = None, *, parser: argparse.ArgumentParser | None = None) -> StrategyFile:
    args = (parser or search_parser()).parse_args(argv)
    L, K = args.num_layers, args.num_clip_layers
    setup_logging(Path(args.log_dir) / paper_search_log_name(L, K, args.select_measure, batch_size=args.bs,
                                                             iter_num=args.iter, search_mode=args.search_mode,
                                                             svcca_mode=args.svcca_mode, thre=args.thre))
    check_prune_count(L, K)
    mode = args.select_measure if args.select_measure in BASELINES else args.search_mode
    out = Path(args.output or search_output(exp_dir(), L, K, args.select_measure, mode))
    claim_file(out, overwrite=args.overwrite)
    raw, matrix_meta, matrix_path = locate_matrix(args)
    matrix = check_matrix(raw, L, name=str(matrix_path))
    verifying = not args.coarse_search_only and args.verify_wer
    if args.repair != "none" and not verifying:
        raise ComflpError("--repair ranks the candidates of the fine search: drop --coarse_search_only / "
                          "--verify_wer false, or --repair")
    check_matrix_model(matrix_meta, num_layers=L, model=None, where=str(matrix_path))  # the depth; the model below
    stack = matrix_meta.get("stack", "encoder")
    if args.stack is not None and args.stack != stack:
        raise ComflpError(f"--stack {args.stack_name} but {matrix_path} was measured on the {stack} stack")
    log.info("Layer pruning %d of %d %s layers; %s search on %s", K, L, stack, mode, matrix_path)
    found_coarse = coarse(matrix, K, mode=mode, top_n=args.topk_num, beam_size=args.beam_size, seed=args.seed,
                          allowed=_expressible(args.model, stack))
    result = found_coarse.result
    if result.path:
        for i, step in enumerate(result.path, 1):
            log.info("prune %d layer,  prior_clipped_layers: %s", i, [list(b) for b in Candidate(step).blocks])
    cands = result.candidates[:1] if mode == "greedy" else result.candidates
    for i, c in enumerate(cands, 1):
        log.info("%d-th layer prunning (%s_measure: %r): %s", i, args.select_measure, c.score,
                 [list(b) for b in c.blocks])
    meta = found_coarse.meta(measure=args.select_measure, matrix=str(matrix_path), k=K)
    if verifying:
        from ..model import fingerprint
        from ..stages import fine as fine_stage
        from ..verify import RACE_CONFIDENCE

        if args.race_confidence is None:
            args.race_confidence = RACE_CONFIDENCE  # imported here: coarse-only runs do not load transformers
        fine = _fine_search(args, stack)
        check_matrix_model(matrix_meta, num_layers=L, model=args.model, where=str(matrix_path),
                           fingerprint=lambda: fingerprint(fine.loaded.model))
        if args.repair != "none":
            fine.repair = fit_repair_from_flags(args, fine.loaded, fine.prompt, candidates=[c.pruned for c in cands],
                                                stack=stack)
            log.info("repair (%s) of %d cuts fitted in %.1f s", args.repair, len(fine.repair.maps),
                     fine.repair.seconds)
            meta["repair"] = fine.repair.record()
        log.info("--- fine search on %d utterances of %s%s%s", len(fine.utts), args.verify_data_dir,
                 f" (race, confidence {args.race_confidence})" if args.race else "",
                 f", each candidate after --repair {args.repair}" if args.repair != "none" else "")
        found = fine_stage(fine, cands, racing=args.race, confidence=args.race_confidence, seed=args.seed)
        report = found.report
        for c, n in zip(report.candidates, report.decoded):
            log.info("For %s: clipped wer : %r%%%s", [list(b) for b in c.blocks], 100 * c.cer,
                     f"  (dropped after {n} of {len(fine.utts)} utterances)" if n < len(fine.utts) else "")
        log.info("WERs: %s", [c.cer for c in report.candidates])
        if report.pearson is not None:
            log.info("correlation between wer and correlation measure: %r", report.pearson)
        cands = found.ranked
        meta.update(found.meta(data=str(args.verify_data_dir), model=str(args.model)))
        log.info("pick: %s, %s %.2f%%; %d candidate-utterance decodes (full evaluation: %d)",
                 [list(b) for b in report.best.blocks], meta["error_rate"], 100 * report.best.cer, sum(report.decoded),
                 len(fine.utts) * len(report.candidates))
        _log_languages(meta)
        if meta.get("unusable"):
            log.warning(meta["unusable"])
    strategy = StrategyFile(L, cands, meta, stack=stack)
    strategy.save(out, overwrite=args.overwrite)
    print(_table(cands, meta.get("error_rate", "CER")))
    if meta.get("unusable"):
        print(meta["unusable"])
    print(f"strategy file: {out}")
    return strategy


def _log_languages(meta: dict) -> None:
    """Log the prompt languages a multilingual model detected (once, with the full model)."""
    if meta.get("languages"):
        log.info("prompt languages, detected by the full model and given to every candidate: %s",
                 ", ".join(f"{k} x{n}" for k, n in meta["languages"].items()))


def glp_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python search_strategy/wer_based_greedy_search.py",
                                description="Greedy layer pruning by CER/WER (GLP), the paper's slow baseline: "
                                            "each step removes the layer whose removal costs least on the subset.")
    p.add_argument("--num_layers", type=positive_int, default=12, help="layers of the model (default: %(default)s)")
    p.add_argument("--num_clip_layers", type=positive_int, default=6, help="K, layers to prune (default: %(default)s)")
    p.add_argument("--output", type=Path, default=None, help="strategy JSON (default: exp/search/clip{L}to{L-K}_glp.json)")
    add_stack(p, default="encoder", help="the layer stack to prune (encoder-decoder models; default: %(default)s)")
    add_verify_arguments(p)
    return p


@exit_on_error
def glp_main(argv: list[str] | None = None) -> StrategyFile:
    from ..stages import glp, glp_meta

    args = glp_parser().parse_args(argv)
    L, K = args.num_layers, args.num_clip_layers
    check_prune_count(L, K)
    out = Path(args.output or glp_output(exp_dir(), L, K))
    claim_file(out, overwrite=args.overwrite)
    setup_logging(Path(args.log_dir) / glp_log_name(L, K))
    fine = _fine_search(args, args.stack)
    result = glp(fine, K, progress=not args.quiet)
    final = result.path[-1]
    meta = glp_meta(result, fine, data=str(args.verify_data_dir), model=str(args.model))
    _log_languages(meta)
    unusable = meta.get("unusable")
    if unusable:
        log.warning(unusable)
    strategy = StrategyFile(L, [final], meta, stack=args.stack)
    strategy.save(out, overwrite=args.overwrite)
    print(_table(result.path, meta["error_rate"]))
    if unusable:
        print(unusable)
    print(f"strategy file: {out}")
    return strategy


def main(argv: list[str] | None = None) -> StrategyFile:
    """``comflp search``: the paper's search with the evidence-based default measure."""
    return search_main(argv, parser=search_parser(default_measure=EVIDENCE_MEASURE, prog="comflp search"))
