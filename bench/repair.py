"""Repair at the cut without training: the zero-shot test error of a pruned model before and after repair.

    python bench/repair.py [--rows demo-12l,demo-24l,demo-whisper,tiny.en] [--heal_epochs 3]

For each model and cut (the CoMFLP picks of the README and BENCHMARKS.md), the test split of the embedded
corpus in the model's language is decoded by the full model, the pruned model, and the pruned model
repaired with ``affine`` and ``linear`` maps (``linear`` only where it folds: pre-LN layers), fitted on
128 utterances of the train split (seed 0). The cost of a repair (calibration + fit seconds) is set
against one fine-search evaluation: decoding that cut on the fine-search subset (the first 200 utterances
of the dev split), timed in the same run.

``--heal_epochs N`` also heals demo-12l's pick for N epochs (``comflp demo``'s recipe: distillation,
LayerDrop 0.1, lr 1e-4, batch 8, the first 1800 training utterances, average of 2) from the unrepaired and
from the linear-repaired start, and tests both.

Resumable: every finished unit is written to the results JSON at once and skipped when run again; healing
resumes from its own checkpoints under ``--work``. Writes bench/results/repair.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from comflp.cli.argtypes import non_negative_int, threads
from comflp.cli.options import corpus_split
from comflp.demo.corpus import read_corpus
from comflp.errors import ComflpError
from comflp.paths import REPO_ROOT


@functools.cache
def _real_whisper():
    """``bench/real_whisper.py`` (the real checkpoint's converter and the resumable results), loaded by path as
    the tests load it: bench/ is scripts, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_real_whisper", Path(__file__).with_name("real_whisper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

MODELS = REPO_ROOT / "models"
# (stack, 1-based layers) per model: the picks the README and BENCHMARKS.md report before healing
ROWS = {
    "demo-12l": [("encoder", [3, 4, 6, 8, 10, 11])],
    "demo-24l": [("encoder", [3, 5, 6, 8, 9, 11, 13, 14, 16, 19, 21, 23])],
    "demo-whisper": [("encoder", [2, 4]), ("decoder", [2, 3])],
    # the real checkpoint: CoMFLP's one- and two-layer picks per stack (bench/real_whisper.py)
    "tiny.en": [("encoder", [3]), ("encoder", [2, 4]), ("decoder", [2]), ("decoder", [2, 3])],
}
KINDS = ("affine", "linear")


class Bench:
    """The results JSON, one unit at a time (a /-path: computed once, saved at once)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.results = json.loads(output.read_text()) if output.is_file() else {}

    def unit(self, key: str, compute):
        return _real_whisper().stored_unit(self.results, self.output, key, compute)


def model_dir(name: str) -> Path:
    if name == "tiny.en":
        return _real_whisper().converted()  # the real checkpoint, converted once into the cache
    return MODELS / name


def pruned_copy(loaded, stack: str, layers: list[int], fitted=None):
    """``loaded`` without ``layers`` of ``stack`` (in memory), with ``fitted`` folded in."""
    from comflp.model import num_layers, prune
    from comflp.repair import fold

    model = prune(loaded.model, layers if stack == "encoder" else [], decoder_pruned=layers if stack == "decoder" else [])
    if fitted is not None:
        fold(model, fitted, kept={stack: [i for i in range(num_layers(loaded.model, stack)) if i + 1 not in layers]})
    return replace(loaded, model=model)


def run_model(bench: Bench, name: str) -> None:
    from comflp.model import load_model
    from comflp.repair import calibration_subset
    from comflp.stages import repair, score
    from comflp.verify import FineSearch, verify_subset

    loaded = load_model(model_dir(name), allow_encoder_decoder=True, need_tokenizer=True)
    test = read_corpus(corpus_split(None, "test", loaded))
    calib = calibration_subset(read_corpus(corpus_split(None, "train", loaded)), 128, 0)
    subset = verify_subset(read_corpus(corpus_split(None, "dev", loaded)), 10, 20)

    def rate(model) -> float:
        return score(model, test, batch_size=16).error_rate.rate

    bench.unit(f"{name}/full", lambda: rate(loaded))
    for stack, layers in ROWS[name]:
        key = f"{name}/{stack}/{','.join(map(str, layers))}"
        bench.unit(f"{key}/none", lambda: rate(pruned_copy(loaded, stack, layers)))

        def evaluation_seconds() -> float:
            engine = FineSearch(loaded, subset, batch_size=20, progress=False, stack=stack)
            engine.evaluate([layers])  # warm-up: torch's first calls, the audio's first reads
            t0 = time.perf_counter()
            engine.evaluate([layers])
            return time.perf_counter() - t0

        bench.unit(f"{key}/one_evaluation_seconds", evaluation_seconds)
        for kind in KINDS:
            def repaired(kind=kind) -> dict:
                try:
                    fitted = repair(loaded, calib, kind=kind, data="train split, 128 utterances, seed 0",
                                    **({"layers": layers} if stack == "encoder" else {"decoder_layers": layers}))
                except ComflpError as err:  # linear on post-LN layers: said, not run
                    return {"refused": str(err)}
                return {"test_rate": rate(pruned_copy(loaded, stack, layers, fitted)), "seconds": fitted.seconds,
                        "cuts": [m.record() for m in fitted.maps], "skipped": [s.record() for s in fitted.skipped]}

            bench.unit(f"{key}/{kind}", repaired)


def heal(bench: Bench, work: Path, epochs: int) -> None:
    """demo-12l's pick healed from the unrepaired and the linear-repaired start, same recipe and epochs."""
    from comflp.model import load_model
    from comflp.finetune import FinetuneConfig
    from comflp.stages import average, evaluate, finetune

    layers = ROWS["demo-12l"][0][1]
    test_dir = corpus_split(None, "test", None)
    for start in ("none", "linear"):
        def healed(start=start) -> dict:
            exp = finetune(FinetuneConfig(
                           model=str(MODELS / "demo-12l"), output_dir=work / f"heal-{start}-{epochs}",
                           layers=",".join(map(str, layers)),
                           epochs=epochs, max_train_utts=1800, batch_size=8, grad_accum=1, lr=1e-4, distill=True,
                           layerdrop=0.1, test_num_batch=4, valid_batch_size=50, quiet=True, resume_epoch=-1,
                           repair=start,
                           train_data_dir=corpus_split(None, "train", None),
                           valid_data_dir=corpus_split(None, "dev", None)))
            averaged = average(exp, num=min(2, epochs), overwrite=True)
            tested = evaluate(load_model(averaged, need_tokenizer=True), read_corpus(test_dir),
                              work / f"test-{start}-{epochs}", data=str(test_dir), overwrite=True)
            return {"test_rate": tested.scored.error_rate.rate,
                    "valid_rate_per_epoch": [r["valid_cer"] for r in exp.read_metrics() if "valid_cer" in r]}

        bench.unit(f"heal/{epochs}/{start}", healed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help="models to run, of " + ", ".join(ROWS))
    p.add_argument("--heal_epochs", type=non_negative_int, default=0,
                   help="also heal demo-12l's pick from both starts for this many epochs (0: no healing)")
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--work", type=Path, default=REPO_ROOT / "exp" / "bench_repair")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "repair.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        raise SystemExit(f"error: unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    bench = Bench(args.output)
    bench.results["machine"] = {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                "cpus": os.cpu_count()}
    for name in args.rows.split(","):
        run_model(bench, name)
    if args.heal_epochs:
        heal(bench, args.work, args.heal_epochs)


if __name__ == "__main__":
    main()
