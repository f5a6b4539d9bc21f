"""``make demo`` / ``comflp demo``: the CoMFLP pipeline on the embedded default, as numbered stages.

Stages (icefall style: each one is skipped when its outputs are complete, so
a re-run resumes; ``--stage`` / ``--stop_stage`` select a range, ``--force``
re-runs them); every file goes under ``--exp_dir``:

  0  corpus   generate the embedded corpus if missing
  1  measure  DC (paper recipe) and SVCCA (mode T) matrices + heatmaps
  2  search   exact top-10 coarse search L -> L-K on DC (the exhaustive top-10 without
              enumerating), fine search (CER) on the dev split
  3  report   which measure predicts the CER: more measurement settings, rank correlations
              of every measure's score with the CER of sampled strategies (a table)
  4  prune    save the best candidate as an HF model
  5  test     full vs pruned model on the test split: CER, parameters, real-time factor
  6  finetune heal the pruned model with CTC + distillation from the full model (a few epochs)
  7  average  average the best epochs by validation CER
  8  retest   the healed model on the test split

It ends with a summary table and PNGs under <exp_dir>/figure/: the correlation
heatmaps, the candidates' score vs CER, and the healing curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .artifacts import ExperimentDir, dc_dump_name, source_id
from .errors import exit_on_error
from .options import ArgumentParser, positive_int
from .logs import setup_logging
from .paths import DEMO_MODEL_DIR, EXP_DIR, demo_split

log = logging.getLogger("comflp.demo")

STAGES = ("corpus", "measure", "search", "report", "prune", "test", "finetune", "average", "retest")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="comflp demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--exp_dir", type=Path, default=None,
                   help="all outputs (default: exp/demo for the demo model, else exp/demo_<model dir name>_clip<K>); "
                        "a dir holding a run with other settings is refused unless --force")
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model to prune (default: the demo model)")
    p.add_argument("--num_clip_layers", type=positive_int, default=6, help="layers to prune (default: %(default)s)")
    p.add_argument("--stage", type=int, default=0, help="first stage to run (default: %(default)s)")
    p.add_argument("--stop_stage", type=int, default=len(STAGES) - 1, help="last stage to run (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-run the selected stages even if done")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--ft_epochs", type=int, default=3, help="fine-tuning epochs (default: %(default)s)")
    p.add_argument("--ft_max_train_utts", type=int, default=1800,
                   help="fine-tune on the first N training utterances, to keep the demo short (default: %(default)s)")
    p.add_argument("--ft_batch_size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--ft_lr", type=float, default=1e-4,
                   help="the paper's 2e-5 suits a large pretrained model; the small demo model heals faster "
                        "with more. 3e-4 on 600 utterances healed within the first epoch and then wandered by "
                        "+-0.4 points, inside the dev subset's noise; 1e-4 on 1800 heals monotonically and "
                        "further (default: %(default)s)")
    p.add_argument("--avg_num", type=int, default=2, help="epochs averaged (default: %(default)s)")
    return p


def _done(exp: Path, stage: int) -> Path:
    return exp / ".done" / f"{stage}-{STAGES[stage]}"


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.exp_dir is None:
        default = Path(args.model).resolve() == DEMO_MODEL_DIR.resolve() and args.num_clip_layers == 6
        args.exp_dir = EXP_DIR / ("demo" if default else f"demo_{Path(args.model).name}_clip{args.num_clip_layers}")
    exp: Path = args.exp_dir
    # a finished stage is skipped only if it was run with these settings: never resume another experiment
    settings = {"model": source_id(args.model), "num_clip_layers": args.num_clip_layers,
                **{k: getattr(args, k) for k in ("ft_epochs", "ft_max_train_utts", "ft_batch_size", "ft_lr", "avg_num")}}
    afresh = args.force and args.stage == 0
    ExperimentDir.open(exp, settings=settings, kind="demo", afresh=afresh, flag="--exp_dir",
                       restart_flags="--force (from stage 0)")
    if afresh:
        import shutil

        shutil.rmtree(exp / ".done", ignore_errors=True)  # every stage of the new settings runs again
    setup_logging(exp / "demo.log")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    paths = {
        "dump": exp / "dump", "figure": exp / "figure", "strategy": exp / "search.json",
        "pruned": exp / f"pruned-{args.num_clip_layers}", "test_full": exp / "test_full", "test_pruned": exp / "test_pruned",
        "finetune": exp / "finetune", "test_healed": exp / "test_healed", "report": exp / "measure_report.json",
    }
    for stage in range(args.stage, args.stop_stage + 1):
        marker = _done(exp, stage)
        if marker.exists() and not args.force:
            log.info("stage %d (%s): done earlier, skipped", stage, STAGES[stage])
            continue
        log.info("stage %d (%s)", stage, STAGES[stage])
        start = time.perf_counter()
        ran = _run_stage(stage, args, paths)
        if ran:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{time.perf_counter() - start:.1f} s\n")
    _summary(paths, time.perf_counter() - t0)


DC_BATCH, DC_ITERS = 4, 10  # the paper's DC recipe


def _run_stage(stage: int, args: argparse.Namespace, paths: dict[str, Path]) -> bool:
    # every output lives under --exp_dir, which this pipeline owns: a re-run stage replaces its own outputs
    common = ["--model", str(args.model)]
    again = ["--overwrite"]
    name = STAGES[stage]
    if name == "corpus":
        from .demo_corpus import ensure_demo_corpus

        for split in ("train", "dev", "test"):
            ensure_demo_corpus(demo_split(split))
    elif name == "measure":
        from .analysis import dc_main, svcca_main

        where = ["--dump_dir", str(paths["dump"]), "--figure_dir", str(paths["figure"])]
        dc_main([*common, *where, *again, "--batch_size", str(DC_BATCH), "--iter_num", str(DC_ITERS)])
        svcca_main([*common, *where, *again, "--batch_size", "8", "--iter_num", "4", "--mode", "T",
                    "--thre", "0.99"])
    elif name == "search":

        from .search_cli import search_main

        from .artifacts import load_matrix

        matrix = paths["dump"] / dc_dump_name("mean", DC_BATCH, DC_ITERS)
        layers = int(load_matrix(matrix)[1]["num_layers"])
        search_main([*common, *again, "--num_layers", str(layers), "--num_clip_layers", str(args.num_clip_layers),
                     "--search_mode", "exact", "--measure_file", str(matrix), "--topk_num", "10",
                     "--output", str(paths["strategy"]), "--log_dir", str(Path(args.exp_dir) / "log")])
        _scatter(paths)
    elif name == "report":
        _report(args, paths, common, again)
    elif name == "prune":
        from .cli import prune_main

        prune_main(["--model", str(args.model), "--strategy", str(paths["strategy"]), "--rank", "1",
                    "--output", str(paths["pruned"]), *again])
    elif name == "test":
        from .testset_cli import main as test_main

        test_main(["--model", str(args.model), "--output_dir", str(paths["test_full"]), *again])
        test_main(["--model", str(paths["pruned"]), "--output_dir", str(paths["test_pruned"]), *again])
        _speed(args, paths)
    elif name == "finetune":
        from .finetune import main as finetune_main

        # a forced re-run starts afresh; otherwise an interrupted run resumes from last/
        finetune_main([*common, *(again if args.force else []), "--strategy", str(paths["strategy"]), "--rank", "1",
                       "--output_dir", str(paths["finetune"]), "--epochs", str(args.ft_epochs),
                       "--max_train_utts", str(args.ft_max_train_utts), "--batch_size", str(args.ft_batch_size),
                       "--grad_accum", "1", "--lr", str(args.ft_lr), "--distill", "--test_num_batch", "4",
                       "--valid_batch_size", "50", "--resume_epoch", "-1"])
        _healing_curve(paths)
    elif name == "average":
        from .average import main as average_main

        average_main(["--exp_dir", str(paths["finetune"]), "--num", str(min(args.avg_num, args.ft_epochs)),
                      "--mode", "valid", *again])
    elif name == "retest":
        from .testset_cli import main as test_main

        test_main(["--model", str(ExperimentDir(paths["finetune"]).averaged), "--output_dir",
                   str(paths["test_healed"]), *again])
    return True


def _scatter(paths: dict[str, Path]) -> None:
    from .plots import scatter

    raw = json.loads(paths["strategy"].read_text(encoding="utf-8"))
    cands = [c for c in raw["candidates"] if "cer" in c]
    if cands:
        scatter([c["score"] for c in cands], [100 * c["cer"] for c in cands], paths["figure"] / "score_vs_cer.png",
                xlabel="coarse score (DC)", ylabel="CER on dev subset (%)", title="Fine search: candidates")


def _report(args: argparse.Namespace, paths: dict[str, Path], common: list[str], again: list[str]) -> None:
    """Measure the settings worth comparing, then rank every measure by how well it predicts the CER."""
    from .analysis import dc_main, measure_main
    from .report_cli import main as report_main

    where = ["--dump_dir", str(paths["dump"]), "--figure_dir", str(paths["figure"]), "--quiet"]
    dc_main([*common, *where, *again, "--batch_size", "32", "--iter_num", "10"])
    dc_main([*common, *where, *again, "--batch_size", "32", "--iter_num", "10", "--unbiased"])
    # the paper's own DC recipe: padded audio through the encoder, padded frames averaged in
    paper = paths["dump"] / "paper"
    dc_main([*common, "--dump_dir", str(paper), "--figure_dir", str(paper), "--quiet", *again, "--batch_size",
             str(DC_BATCH), "--iter_num", str(DC_ITERS), "--pad_audio", "--pool_padding", "--no_plot"])
    streamed = paths["dump"] / "streamed_T.npz"
    measure_main([*common, *where, *again, "--measures", "svcca,pwcca,cka,cosine,angular", "--svcca_mode", "T",
                  "--batch_size", "8", "--iter_num", "10", "--output", str(streamed)])
    labelled = {"dc_bs4": paths["dump"] / dc_dump_name("mean", DC_BATCH, DC_ITERS),
                "dc_bs32": paths["dump"] / dc_dump_name("mean", 32, 10),
                "dc_unbiased_bs32": paths["dump"] / dc_dump_name("mean", 32, 10, unbiased=True),
                "dc_bs4_paper_padding": paper / dc_dump_name("mean", DC_BATCH, DC_ITERS)}
    argv = [*common, *again, "--num_clip_layers", str(args.num_clip_layers), "--num_strategies", "40",
            "--output", str(paths["report"]), "--quiet", "--measure_file", str(streamed)]
    for label, f in labelled.items():
        argv += ["--measure_file", f"{label}={f}"]
    report_main(argv)


def _healing_curve(paths: dict[str, Path]) -> None:
    from .plots import curves

    rows = ExperimentDir(paths["finetune"]).read_metrics()
    reference = next((r["source_valid_cer"] for r in rows if r["epoch"] == 0 and "source_valid_cer" in r), None)
    curves({"pruned model, dev CER": ([r["epoch"] for r in rows], [100 * r["valid_cer"] for r in rows])},
           paths["figure"] / "healing_curve.png", xlabel="fine-tuning epoch (0 = pruned, before healing)",
           ylabel="dev CER (%)", title="Healing the pruned model",
           hlines={"unpruned model": 100 * reference} if reference is not None else None)


def _speed(args: argparse.Namespace, paths: dict[str, Path]) -> None:
    """Decode speed-up of the pruned model, timed as a pair after warm-up on the same test batches."""
    from . import atomic
    from .decode import compare_speed
    from .model import load_model
    from .options import read_corpus

    full = load_model(args.model, need_tokenizer=True)
    pruned = load_model(paths["pruned"], need_tokenizer=True)
    utts = read_corpus(demo_split("test"))[:64]
    cmp = compare_speed(full.model, pruned.model, full.feature_extractor, full.tokenizer, utts, batch_size=16)
    atomic.write_json(paths["test_pruned"] / "speed.json",
                      {"utterances": len(utts), "audio_seconds": cmp.audio_seconds, "full_seconds": cmp.first_seconds,
                       "pruned_seconds": cmp.second_seconds, "speedup": cmp.speedup})
    log.info("decode speed-up of the pruned model: %.2fx (paired, after warm-up)", cmp.speedup)


def _summary(paths: dict[str, Path], seconds: float) -> None:
    rows = []
    for name, key in (("full model", "test_full"), ("pruned, before healing", "test_pruned"),
                      ("pruned, after healing", "test_healed")):
        f = paths[key] / "test_asr.json"
        if f.exists():
            r = json.loads(f.read_text())
            rows.append((name, r["num_layers"], r["num_parameters"], 100 * r["error_rate"], r["rtf"]))
    if not rows:
        return
    lines = ["", f"{'model':<24} {'layers':>6} {'parameters':>12} {'test CER':>9} {'RTF':>8}"]
    lines += [f"{n:<24} {l:>6} {p:>12,} {c:>8.2f}% {rtf:>8.4f}" for n, l, p, c, rtf in rows]
    speed = paths["test_pruned"] / "speed.json"
    if speed.exists():
        lines.append(f"decode speed-up of the pruned model: {json.loads(speed.read_text())['speedup']:.2f}x "
                     "(the two models timed as a pair on the same batches, after warm-up)")
    s = paths["strategy"]
    if s.exists():
        best = json.loads(s.read_text())["candidates"][0]
        lines.append(f"pruned layers {best['pruned']} (blocks {best['blocks']}), chosen by fine search")
    lines.append(f"demo finished in {seconds:.0f} s; outputs under {paths['strategy'].parent}")
    print("\n".join(lines))
