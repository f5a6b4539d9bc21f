"""``make demo`` / ``comflp demo``: the CoMFLP pipeline on the embedded default, as numbered stages.

Stages (icefall style: each one is skipped when its outputs are complete, so
a re-run resumes; ``--stage`` / ``--stop_stage`` select a range, ``--force``
re-runs them); every file goes under ``--exp_dir``:

  0  corpus   generate the embedded corpus if missing
  1  measure  DC (paper recipe) and SVCCA (mode T) matrices + heatmaps, per layer stack
  2  search   exact top-10 coarse search L -> L-K on DC (the exhaustive top-10 without
              enumerating), fine search (CER) on the dev split; the linspace baseline
              (evenly spaced layers kept, first and last always: distil-whisper's choice)
  3  report   which measure predicts the CER: more measurement settings, rank correlations
              of every measure's score with the CER of sampled strategies (a table)
  4  prune    save CoMFLP's pick and the baseline's as HF models, and CoMFLP's pick with its cuts
              repaired (least-squares maps folded into the kept weights, no training; --repair)
  5  test     the full and the pruned models on the test split: CER, parameters, real-time factor
  6  finetune heal the pruned models with CTC (Whisper: cross-entropy) + distillation from the
              full model (quick: 1 epoch on 600 utterances; --full: 3 epochs on 1800, the documented run)
  7  average  average the best epochs by validation CER
  8  retest   the healed models on the test split

An encoder-decoder model (Whisper) goes through every stage once for its
encoder and once for its decoder, each pruned by K layers with the other stack
whole. It ends with a summary table (full model, linspace pick, CoMFLP pick,
before and after healing, CoMFLP's pick repaired without training) and PNGs under <exp_dir>/figure/: the correlation
heatmaps, the candidates' score vs CER, and the healing curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import atomic
from .layout import DemoDir
from ..artifacts import REPAIR_FILE, claim_file, heatmap_file, is_matrix_set, load_matrix, source_id
from ..errors import ComflpError, exit_on_error
from ..finetune import FinetuneConfig
from ..hidden import MeasureSettings
from ..heads import check_prompt
from ..logs import setup_logging
from ..cli.argtypes import non_negative_int, positive_float, positive_int, probability_below_one, str2bool, threads
from ..cli.options import ArgumentParser, add_prompt, corpus_split, resolve_prompt
from .corpus import read_corpus
from ..paths import DEMO_MODEL_DIR, exp_dir
from ..stages import PAPER_DC

log = logging.getLogger(__name__)

STAGES = ("corpus", "measure", "search", "report", "prune", "test", "finetune", "average", "retest")
FT_LAYERDROP = FinetuneConfig.layerdrop  # healing's LayerDrop: the fine-tuning default
SVCCA_T = MeasureSettings(measures=("svcca",), batch_size=8, iter_num=4, sample_mode="T", thre=0.99)
TOP_N = 10
SEARCH_SEED = 42  # `comflp search`'s default: the order in which a race decodes the subset
VERIFY_BATCHES, VERIFY_BATCH_SIZE = 10, 32  # the fine search's subset: the first 320 dev utterances
# how the demo heals: the quick default answers in minutes (1 epoch on 600 utterances at 3e-4, which healed the
# demo model within its first epoch), --full is the documented run (3 epochs on 1800 at 1e-4, 2 averaged)
HEALING = {"quick": {"ft_epochs": 1, "ft_max_train_utts": 600, "ft_lr": 3e-4, "avg_num": 1},
           "full": {"ft_epochs": 3, "ft_max_train_utts": 1800, "ft_lr": 1e-4, "avg_num": 2}}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="comflp demo", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--exp_dir", type=Path, default=None,
                   help="all outputs (default: exp/demo for the demo model, else exp/demo_<model dir name>_clip<K>); "
                        "a dir holding a run with other settings is refused unless --force")
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="model to prune (default: the demo model)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="a dir holding the Kaldi dirs train/ (measuring, healing), dev/ (fine search, validation) "
                        "and test/ (default: the embedded corpus, generated if missing)")
    p.add_argument("--num_clip_layers", type=positive_int, default=None,
                   help="layers to prune from each stack (default: half of them, 6 of the demo model's 12)")
    p.add_argument("--stage", type=non_negative_int, default=0, help="first stage to run (default: %(default)s)")
    p.add_argument("--stop_stage", type=non_negative_int, default=len(STAGES) - 1, help="last stage to run (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-run the selected stages even if done")
    p.add_argument("--threads", type=threads, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--heal_baseline", type=str2bool, default=True,
                   help="heal the linspace pick too, so that the two picks are compared after healing as well as "
                        "before (default: %(default)s)")
    p.add_argument("--full", action="store_true",
                   help="the complete run, whose numbers README documents: heal 3 epochs on 1800 utterances at "
                        "1e-4 and average 2 (about 12 minutes on 2 cores, outputs under exp/demo-full); without it "
                        "the quick run heals 1 epoch on 600 utterances at 3e-4 (a few minutes, under exp/demo). "
                        "The flags below override either")
    p.add_argument("--ft_epochs", type=positive_int, default=None,
                   help="fine-tuning epochs (default: 1 quick, 3 --full)")
    p.add_argument("--ft_max_train_utts", type=positive_int, default=None,
                   help="fine-tune on the first N training utterances (default: 600 quick, 1800 --full)")
    p.add_argument("--ft_batch_size", type=positive_int, default=8, help="(default: %(default)s)")
    p.add_argument("--ft_lr", type=positive_float, default=None,
                   help="the paper's 2e-5 suits a large pretrained model; the small demo model heals faster "
                        "with more. 3e-4 on 600 utterances healed within the first epoch and then wandered by "
                        "+-0.4 points, inside the dev subset's noise; 1e-4 on 1800 heals monotonically and "
                        "further (default: 3e-4 quick, 1e-4 --full)")
    p.add_argument("--ft_layerdrop", type=probability_below_one, default=FT_LAYERDROP,
                   help="LayerDrop while healing; the Whisper table in README was measured when LayerDrop did not "
                        "yet reach Whisper's layers, as --ft_layerdrop 0 does (default: %(default)s)")
    p.add_argument("--avg_num", type=positive_int, default=None, help="epochs averaged (default: 1 quick, 2 --full)")
    p.add_argument("--repair", choices=("auto", "none", "affine", "linear"), default="auto",
                   help="also prune CoMFLP's pick with its cuts repaired (comflp prune --repair: least-squares maps "
                        "folded into the kept weights, no training) and test it beside the unrepaired pick; auto: "
                        "linear where the layers allow it (pre-LN), else affine (default: %(default)s)")
    add_prompt(p)
    return p


@dataclass(frozen=True)
class Variant:
    """A pruned model of the demo: the stack pruned and the method that chose its layers."""

    stack: str
    method: str  # "comflp", "linspace", or "repaired" (CoMFLP's pick with its cuts repaired, not healed)

    def label(self, two_stacks: bool, titles: dict[str, str] | None = None) -> str:
        """The variant's row name; with two stacks, prefixed by the stack's title (``Family.stack_titles``)."""
        name = {"comflp": "CoMFLP pick", "linspace": "linspace pick", "repaired": "CoMFLP pick repaired"}[self.method]
        return f"{(titles or {}).get(self.stack, self.stack)}: {name}" if two_stacks else name


@dataclass
class Run:
    """What every stage of one demo run needs."""

    args: argparse.Namespace
    exp: DemoDir
    loaded: object  # comflp.model.LoadedModel
    stacks: tuple[str, ...]
    k: int

    @property
    def stack_titles(self) -> dict[str, str]:
        """What the tables call each stack (the family table's ``stack_titles``)."""
        from ..model import family_of

        return dict(family_of(self.loaded.model).stack_titles)

    @property
    def prompt(self):
        """The encoder-decoder model's language and task (comflp.prompt), from the flags."""
        return resolve_prompt(self.args)

    def split(self, name: str) -> Path:
        """The Kaldi dir of one split (train, dev, test) of the corpus."""
        return corpus_split(None if self.args.corpus is None else self.args.corpus / name, name, self.loaded,
                            self.prompt)

    @property
    def variants(self) -> list[Variant]:
        """Per stack: CoMFLP's pick, it repaired (unless --repair none, or nothing folds into the stack's layers:
        a speech-LLM's bias-free feed-forwards) and the linspace baseline."""
        from ..repair import unrepairable

        def methods(stack: str) -> tuple[str, ...]:
            repaired = self.args.repair != "none" and unrepairable(self.loaded.model, stack) is None
            return ("comflp",) + (("repaired",) if repaired else ()) + ("linspace",)

        return [Variant(s, m) for s in self.stacks for m in methods(s)]

    def healed_variants(self) -> list[Variant]:
        """The variants healed: CoMFLP's picks, and the baseline's unless it is the same pick or not wanted (the
        repaired pick is shown without training)."""
        out = []
        for v in self.variants:
            if v.method == "repaired" or (
                    v.method == "linspace" and (not self.args.heal_baseline or self.same_as_comflp(v))):
                continue
            out.append(v)
        return out

    def strategy_path(self, v: Variant) -> Path:
        """The strategy file whose best candidate ``v`` prunes (a repaired pick: CoMFLP's)."""
        return self.exp.strategy(v.stack, "comflp" if v.method == "repaired" else v.method)

    def pruned_layers(self, v: Variant) -> list[int]:
        from ..strategy import StrategyFile

        return StrategyFile.load(self.strategy_path(v)).candidates[0].pruned

    def same_as_comflp(self, v: Variant) -> bool:
        return v.method == "linspace" and self.pruned_layers(v) == self.pruned_layers(Variant(v.stack, "comflp"))


def _load(model: str):
    from ..model import load_model

    return load_model(model, need_tokenizer=True, need_ctc_head=True, allow_encoder_decoder=True)


def resolve_healing(args: argparse.Namespace) -> argparse.Namespace:
    """The healing flags not given, from the run's profile (:data:`HEALING`: quick, or ``--full``)."""
    for name, value in HEALING["full" if args.full else "quick"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    from ..model import family_of, num_layers

    args = resolve_healing(build_parser().parse_args(argv))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loaded = _load(args.model)
    check_prompt(loaded.model, resolve_prompt(args))  # before the experiment dir is made
    stacks = tuple(family_of(loaded.model).stacks)
    depths = {s: num_layers(loaded.model, s) for s in stacks}
    k = args.num_clip_layers or min(depths.values()) // 2
    for s, depth in depths.items():
        if not 0 < k < depth:
            raise ComflpError(f"--num_clip_layers {k}: {args.model}'s {s} has {depth} layers (need 0 < K < {depth})")
    if args.corpus is not None:  # before anything is written
        for split in ("train", "dev", "test"):
            if not (args.corpus / split).is_dir():
                raise ComflpError(f"--corpus {args.corpus} has no {split}/ (a Kaldi dir with wav.scp and text)")
    if args.exp_dir is None:
        default = Path(args.model).resolve() == DEMO_MODEL_DIR.resolve() and k == 6
        name = "demo" if default else f"demo_{Path(args.model).name}_clip{k}"
        args.exp_dir = exp_dir() / (f"{name}-full" if args.full else name)
    # a finished stage is skipped only if it was run with these settings: never resume another experiment
    settings = {"model": source_id(args.model), "num_clip_layers": k,
                **({"corpus": source_id(args.corpus)} if args.corpus is not None else {}),
                **{n: getattr(args, n) for n in ("ft_epochs", "ft_max_train_utts", "ft_batch_size", "ft_lr", "avg_num",
                                                 "heal_baseline")},
                # recorded only when not the default, so that runs made before the flag existed still resume
                **({"ft_layerdrop": args.ft_layerdrop} if args.ft_layerdrop != FT_LAYERDROP else {}),
                **{n: getattr(args, n) for n in ("language", "task") if getattr(args, n) is not None},
                **({"repair": args.repair} if args.repair != "auto" else {})}
    afresh = args.force and args.stage == 0
    exp = DemoDir.open(args.exp_dir, settings=settings, kind="demo", afresh=afresh, flag="--exp_dir",
                       restart_flags="--force (from stage 0)")
    if afresh:
        exp.clear_done()  # every stage of the new settings runs again
    setup_logging(exp.log_file)
    run = Run(args, exp, loaded, stacks, k)
    t0 = time.perf_counter()
    for stage in range(args.stage, args.stop_stage + 1):
        marker = exp.done_marker(stage, STAGES[stage])
        if marker.exists() and not args.force:
            log.info("stage %d (%s): done earlier, skipped", stage, STAGES[stage])
            continue
        log.info("stage %d (%s)", stage, STAGES[stage])
        start = time.perf_counter()
        STAGE_FUNCTIONS[STAGES[stage]](run)
        atomic.write_text(marker, f"{time.perf_counter() - start:.1f} s\n")
    _summary(run, time.perf_counter() - t0)


def _corpus(run: Run) -> None:
    from .corpus import ensure_demo_corpus

    if run.args.corpus is None:
        for split in ("train", "dev", "test"):
            ensure_demo_corpus(run.split(split))


def _dc_matrix(run: Run, stack: str) -> Path:
    from ..artifacts import dc_dump_name

    return run.exp.dump / dc_dump_name("mean", PAPER_DC.batch_size, PAPER_DC.iter_num, stack=stack)


def _save_measured(measured, path: Path, *, title: str | None, figure_dir: Path | None) -> Path:
    """Save (replacing this run's earlier output) and, unless ``title`` is None, draw a heatmap of each matrix
    (an .npz's are titled by measure)."""
    from ..plots import heatmap

    path = measured.save(path, overwrite=True)
    if title is not None:
        for name, m in measured.matrices.items():
            png = heatmap_file(figure_dir or path.parent, path, name)
            heatmap(m, claim_file(png, overwrite=True), title=name if is_matrix_set(path) else title)
    log.info("matrices %s -> %s", ",".join(measured.matrices), path)
    return path


def _measure(run: Run) -> None:
    from ..artifacts import svcca_dump_name
    from ..stages import measure

    train = run.split("train")
    utts = read_corpus(train)
    for stack in run.stacks:
        dc = measure(run.loaded, utts, PAPER_DC, stack=stack, data=str(train), progress=True, prompt=run.prompt)
        _save_measured(dc, _dc_matrix(run, stack), title=f"DC (mean, dc){'' if stack == 'encoder' else ', ' + stack}",
                       figure_dir=run.exp.figure)
        svcca = measure(run.loaded, utts, SVCCA_T, stack=stack, data=str(train), progress=True, prompt=run.prompt)
        name = svcca_dump_name(SVCCA_T.batch_size, SVCCA_T.iter_num, SVCCA_T.sample_mode, SVCCA_T.thre, stack=stack)
        _save_measured(svcca, run.exp.dump / name, title=f"SVCCA (T, thre {SVCCA_T.thre})", figure_dir=run.exp.figure)


def _engine(run: Run, stack: str):
    from ..verify import FineSearch, verify_subset

    utts = verify_subset(read_corpus(run.split("dev")), VERIFY_BATCHES, VERIFY_BATCH_SIZE)
    return FineSearch(run.loaded, utts, batch_size=VERIFY_BATCH_SIZE, progress=True, stack=stack,
                      prompt=run.prompt)


def _search(run: Run) -> None:
    from ..artifacts import check_matrix_model
    from ..model import fingerprint
    from ..model.layers import expressible
    from ..search import check_matrix
    from ..stages import coarse, fine
    from ..strategy import StrategyFile

    for stack in run.stacks:
        path = _dc_matrix(run, stack)
        raw, meta = load_matrix(path)
        depth = int(meta["num_layers"])
        check_matrix_model(meta, num_layers=depth, model=run.args.model, where=str(path),
                           fingerprint=lambda: fingerprint(run.loaded.model))
        matrix = check_matrix(raw, depth, name=str(path))
        engine = _engine(run, stack)
        for method, mode in (("comflp", "exact"), ("linspace", "linspace")):
            found = coarse(matrix, run.k, mode=mode, top_n=TOP_N, allowed=expressible(run.loaded.model, stack))
            checked = fine(engine, found.candidates, racing=method == "comflp", seed=SEARCH_SEED)
            meta_out = {**found.meta(measure="dc" if method == "comflp" else "linspace", matrix=str(path), k=run.k),
                        **checked.meta(data=str(run.split("dev")), model=str(run.args.model))}
            out = run.exp.strategy(stack, method)
            StrategyFile(depth, checked.ranked, meta_out, stack=stack).save(out, overwrite=True)
            best = checked.ranked[0]
            log.info("%s %s pick: prune %s, dev-subset CER %.2f%% -> %s", stack, method, best.pruned,
                     100 * best.cer, out)
        _scatter(run, stack)


def _scatter(run: Run, stack: str) -> None:
    from ..plots import scatter

    raw = json.loads(run.exp.strategy(stack).read_text(encoding="utf-8"))
    cands = [c for c in raw["candidates"] if "cer" in c]
    if cands:
        scatter([c["score"] for c in cands], [100 * c["cer"] for c in cands],
                claim_file(run.exp.score_plot(stack), overwrite=True),
                xlabel="coarse score (DC)", ylabel="CER on dev subset (%)",
                title=f"Fine search: candidates{'' if stack == 'encoder' else ' (' + stack + ')'}")


def _report(run: Run) -> None:
    """Measure the settings worth comparing, then rank every measure by how well it predicts the CER."""
    from ..artifacts import dc_dump_name
    from ..heads import head_of
    from ..stages import measure, measure_report

    train = run.split("train")
    utts = read_corpus(train)
    dump = run.exp.dump
    for stack in run.stacks:
        settings = {
            "dc_bs4": (PAPER_DC, dump / dc_dump_name("mean", 4, 10, stack=stack)),
            "dc_bs32": (MeasureSettings(measures=("dc",), batch_size=32, iter_num=10),
                        dump / dc_dump_name("mean", 32, 10, stack=stack)),
            "dc_unbiased_bs32": (MeasureSettings(measures=("dc_unbiased",), batch_size=32, iter_num=10),
                                 dump / dc_dump_name("mean", 32, 10, unbiased=True, stack=stack)),
        }
        if "pad_audio" in head_of(run.loaded.model).supports:
            # the paper's own DC recipe: padded audio through the feature encoder, padded frames averaged in
            settings["dc_bs4_paper_padding"] = (
                MeasureSettings(measures=("dc",), batch_size=4, iter_num=10, pad_audio=True, pool_padding=True),
                run.exp.paper_dump / dc_dump_name("mean", 4, 10, stack=stack))
        streamed = MeasureSettings(measures=("svcca", "cka", "cosine", "angular"), batch_size=8, iter_num=10,
                                   sample_mode="T")
        matrices = {}
        for label, (s, path) in list(settings.items()):
            if s.batch_size * s.accum_batch > len(utts):  # a batch statistic needs that many distinct utterances
                log.warning("%s left out of the %s report: a batch of %d needs more than the %d utterances of %s",
                            label, stack, s.batch_size * s.accum_batch, len(utts), train)
                continue
            if label != "dc_bs4":  # measured by stage 1
                _save_measured(measure(run.loaded, utts, s, stack=stack, data=str(train), progress=False, prompt=run.prompt), path,
                               title=None, figure_dir=None)
            matrices[label] = load_matrix(path)[0]
        measured = measure(run.loaded, utts, streamed, stack=stack, data=str(train), progress=False, prompt=run.prompt)
        _save_measured(measured, run.exp.streamed_matrices(stack), title="", figure_dir=run.exp.figure)
        matrices.update(measured.matrices)
        try:  # full CCA is undefined when the samples span too few directions (a small decoder's token states)
            pwcca = measure(run.loaded, utts, replace(streamed, measures=("pwcca",)), stack=stack, data=str(train),
                            progress=False, prompt=run.prompt)
            _save_measured(pwcca, run.exp.streamed_matrices(stack, "pwcca"), title=None, figure_dir=None)
            matrices.update(pwcca.matrices)
        except ComflpError as err:
            log.warning("pwcca left out of the %s report: %s", stack, err)
        depth = matrices["dc_bs4"].shape[0] - 1
        measure_report(_engine(run, stack), matrices, run.k, num_strategies=min(40, math.comb(depth, run.k)),
                       output=run.exp.report(stack), overwrite=True)


CALIB_UTTS, CALIB_SEED = 128, 0  # comflp prune --repair's defaults


def _prune(run: Run) -> None:
    from ..modelcard import strategy_source
    from ..stages import prune
    from ..strategy import StrategyFile

    for v in run.variants:
        layers = run.pruned_layers(v)
        plan = {"layers": layers if v.stack == "encoder" else [],
                "decoder_layers": layers if v.stack == "decoder" else []}
        fitted = _repair(run, plan) if v.method == "repaired" else None
        path = run.strategy_path(v)
        out = prune(run.loaded, plan["layers"], run.exp.pruned(v.stack, v.method, run.k),
                    decoder_layers=plan["decoder_layers"], overwrite=True, repair=fitted,
                    strategy=strategy_source(StrategyFile.load(path), path, 1))
        log.info("%s: pruned %s -> %s", v.label(len(run.stacks) > 1, run.stack_titles), layers, out.path)


def _repair(run: Run, plan: dict):
    """The repair of CoMFLP's pick (``--repair``; auto: linear where it folds, else affine), fitted on the train
    split as ``comflp prune --repair`` does."""
    from ..repair import calibration_subset, foldable_kinds
    from ..stages import repair

    train = run.split("train")
    chosen = calibration_subset(read_corpus(train), CALIB_UTTS, CALIB_SEED)
    data = f"{train} ({len(chosen)} utterances, seed {CALIB_SEED})"
    kind = run.args.repair
    if kind == "auto" and "linear" in foldable_kinds(run.loaded.model, **plan):
        try:
            fitted = repair(run.loaded, chosen, kind="linear", data=data, prompt=run.prompt, **plan)
        except ComflpError as err:  # a small corpus may hold fewer frames (decoder tokens) than a full map needs
            log.warning("linear repair not possible (%s): affine instead", err)
            fitted = repair(run.loaded, chosen, kind="affine", data=data, prompt=run.prompt, **plan)
    else:
        fitted = repair(run.loaded, chosen, kind="affine" if kind == "auto" else kind, data=data, prompt=run.prompt,
                        **plan)
    kind = fitted.kind
    for m in fitted.maps:
        log.info("repair (%s) of %s block %s: R² %.4f (unrepaired %.4f)", kind, m.cut.stack, list(m.cut.block), m.r2,
                 m.r2_unrepaired)
    return fitted


def _test_model(run: Run, model: Path | str, out: Path) -> None:
    from ..stages import evaluate

    evaluate(_load(str(model)), read_corpus(run.split("test")), out, data=str(run.split("test")), overwrite=True,
         prompt=run.prompt)


def _test(run: Run) -> None:
    from ..stages import evaluate

    evaluate(run.loaded, read_corpus(run.split("test")), run.exp.test_full(), data=str(run.split("test")),
         overwrite=True, prompt=run.prompt)
    for v in run.variants:
        _test_model(run, run.exp.pruned(v.stack, v.method, run.k), run.exp.test_pruned(v.stack, v.method))
    _speed(run)


def _finetune(run: Run) -> None:
    from ..stages import finetune

    for v in run.healed_variants():
        # a forced re-run starts afresh; otherwise an interrupted run resumes from last/
        exp = finetune(FinetuneConfig(
                       model=run.args.model, output_dir=run.exp.finetune(v.stack, v.method).root,
                       strategy=run.exp.strategy(v.stack, v.method), rank=1, overwrite=run.args.force,
                       epochs=run.args.ft_epochs, max_train_utts=run.args.ft_max_train_utts,
                       batch_size=run.args.ft_batch_size, grad_accum=1, lr=run.args.ft_lr, distill=True,
                       layerdrop=run.args.ft_layerdrop, language=run.args.language, task=run.args.task,
                       instruction=run.args.instruction,
                       test_num_batch=4, valid_batch_size=50, resume_epoch=-1, quiet=False,  # a bar with an ETA
                       train_data_dir=run.split("train"), valid_data_dir=run.split("dev")))
        log.info("%s healed -> %s", v.label(len(run.stacks) > 1, run.stack_titles), exp.final)
    _healing_curves(run)


def _average(run: Run) -> None:
    from ..stages import average

    for v in run.healed_variants():
        average(run.exp.finetune(v.stack, v.method), num=min(run.args.avg_num, run.args.ft_epochs), overwrite=True)


def _retest(run: Run) -> None:
    for v in run.healed_variants():
        _test_model(run, run.exp.finetune(v.stack, v.method).averaged, run.exp.test_healed(v.stack, v.method))


STAGE_FUNCTIONS = {"corpus": _corpus, "measure": _measure, "search": _search, "report": _report, "prune": _prune,
                   "test": _test, "finetune": _finetune, "average": _average, "retest": _retest}


def _healing_curves(run: Run) -> None:
    from ..plots import curves

    lines, reference = {}, None
    for v in run.healed_variants():
        rows = run.exp.finetune(v.stack, v.method).read_metrics()
        reference = next((r["source_valid_cer"] for r in rows if r["epoch"] == 0 and "source_valid_cer" in r),
                         reference)
        lines[f"{v.label(len(run.stacks) > 1, run.stack_titles)}, dev CER"] = ([r["epoch"] for r in rows],
                                                             [100 * r["valid_cer"] for r in rows])
    curves(lines, claim_file(run.exp.healing_plot(), overwrite=True),
           xlabel="fine-tuning epoch (0 = pruned, before healing)", ylabel="dev CER (%)",
           title="Healing the pruned models", hlines={"unpruned model": 100 * reference} if reference is not None else None)


def _speed(run: Run) -> None:
    """Decode speed-up of CoMFLP's encoder pick, timed as a pair after warm-up on the same test batches."""
    from .. import atomic
    from ..decode import compare_speed
    from ..heads import head_of

    if "compare_speed" not in head_of(run.loaded.model).supports:
        return  # a generation-time comparison is not built yet
    pruned = _load(str(run.exp.pruned("encoder", "comflp", run.k)))
    utts = read_corpus(run.split("test"))[:64]
    cmp = compare_speed(run.loaded.model, pruned.model, run.loaded.feature_extractor, run.loaded.tokenizer, utts,
                        batch_size=16)
    atomic.write_json(run.exp.speed(), {"utterances": len(utts), "audio_seconds": cmp.audio_seconds,
                                        "full_seconds": cmp.first_seconds, "pruned_seconds": cmp.second_seconds,
                                        "speedup": cmp.speedup})
    log.info("decode speed-up of the pruned model: %.2fx (paired, after warm-up)", cmp.speedup)


def _summary(run: Run, seconds: float) -> None:
    exp, two = run.exp, len(run.stacks) > 1
    rows = []
    full = exp.test_result(exp.test_full())
    if full:
        rows.append(("full model", full, "-"))
    for v in run.variants:
        if not exp.strategy(v.stack, "comflp" if v.method == "repaired" else v.method).is_file():
            continue
        layers = run.pruned_layers(v)
        before = exp.test_result(exp.test_pruned(v.stack, v.method))
        same = run.same_as_comflp(v)
        healed_dir = exp.test_healed(v.stack, "comflp" if same else v.method)
        after = exp.test_result(healed_dir)
        name = v.label(two, run.stack_titles) + (" (= CoMFLP's)" if same else "")
        if before and v.method == "repaired":
            record = json.loads((exp.pruned(v.stack, v.method, run.k) / REPAIR_FILE).read_text())
            folded = any(c.get("site") for c in record["cuts"])
            how = record["kind"] if folded else "nothing folds before layer 1"
            rows.append((f"{name} ({how}), no training", before, layers))
        elif before:
            rows.append((f"{name}, before healing", before, layers))
        if after:
            rows.append((f"{name}, after healing", after, layers))
    if not rows:
        return
    width = max(len(r[0]) for r in rows)
    layer_head = "enc+dec layers" if two else "layers"
    lines = ["", f"{'model':<{width}} {layer_head:>14} {'parameters':>12} {'test CER':>9} {'RTF':>8}  pruned"]
    for name, r, pruned in rows:
        depth = f"{r['num_layers']}+{r.get('decoder_layers', '?')}" if two else str(r["num_layers"])
        lines.append(f"{name:<{width}} {depth:>14} {r['num_parameters']:>12,} {100 * r['error_rate']:>8.2f}% "
                     f"{r['rtf']:>8.4f}  {pruned}")
    if exp.speed().is_file():
        lines.append(f"decode speed-up of CoMFLP's pick: {json.loads(exp.speed().read_text())['speedup']:.2f}x "
                     "(the two models timed as a pair on the same batches, after warm-up)")
    took = {m.name.split("-", 1)[1]: float(m.read_text().split()[0])
            for m in sorted(exp.done_markers(), key=lambda m: int(m.name.split("-", 1)[0]))}
    lines.append("stage times: " + ", ".join(f"{name} {t:.0f} s" for name, t in took.items()))
    lines.append(f"the stages took {sum(took.values()):.0f} s in all ({seconds:.0f} s in this run); outputs under "
                 f"{exp.root}")
    print("\n".join(lines))
