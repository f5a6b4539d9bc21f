"""Search cost against depth: CoMFLP's stages and GLP at L = 12, 24, 48, 96 layers, pruning K = L/2.

    python bench/scaling.py [--depths 12,24,48,96] [--subset 64] [--glp_budget_s 900]

Timing uses models of the demo's architecture and width (144) with random
weights, L layers each (time does not depend on the weights), the demo's
processor, and the first ``--subset`` utterances of the embedded dev split.
For each depth, side by side in one run:

- measuring: the paper's DC (batch 4, 10 batches of the train split);
- coarse search: exact top-10 on that matrix;
- fine search of those 10 candidates, full and racing (``comflp.verify.race``;
  with random weights every candidate is about equally wrong, so the race has
  little to drop there: the trained models show what it saves);
- GLP in full while it stays under ``--glp_budget_s``; past that it stops after
  the step that crosses the budget and its total is extrapolated from the
  measured seconds per evaluation times the full evaluation count
  (``glp_evaluations``), and labelled so.

The audio is loaded once per depth, outside every timer. Writes
bench/results/scaling.json and bench/results/scaling.png (log-log).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Wav2Vec2ForCTC

from comflp.cli.argtypes import positive_float, positive_int, seed, threads
from comflp.atomic import write_json
from comflp.demo.recipes import demo_config
from comflp.hidden import collect
from comflp.model import LoadedModel, load_model
from comflp.demo.corpus import read_corpus
from comflp.paths import DEMO_MODEL_DIR, REPO_ROOT, demo_split
from comflp.plots import curves
from comflp.stages import PAPER_DC, comflp_search
from comflp.stages import fine as fine_stage
from comflp.stages import glp as glp_stage
from comflp.verify import FineSearch, glp_evaluations, verify_subset


def random_model(num_layers: int, processor: LoadedModel, seed: int) -> LoadedModel:
    """The demo architecture at ``num_layers`` layers with random weights, using the demo's processor."""
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(demo_config(len(processor.tokenizer), num_layers=num_layers)).eval()
    return LoadedModel(model, processor.feature_extractor, processor.tokenizer, f"random-{num_layers}l")


def time_depth(loaded: LoadedModel, num_layers: int, train, subset, glp_budget_s: float) -> dict:
    k = num_layers // 2
    collect(loaded.model, loaded.feature_extractor, train, replace(PAPER_DC, iter_num=1),
            progress=False)  # warm-up: one-time allocations stay out of the timers
    # one engine per timed search, audio loaded outside the timers: each pays for its own front-end outputs
    full_engine, race_engine, glp_engine = (FineSearch(loaded, subset, batch_size=32, progress=False)
                                            for _ in range(3))
    run = comflp_search(loaded, train, full_engine, k, racing=False)
    measure_s, coarse_s, fine_s = run.measured.seconds, run.coarse.seconds, run.fine.seconds
    full, cands = run.fine.report, run.coarse.candidates
    race_run = fine_stage(race_engine, cands, racing=True)
    raced, race_s = race_run.report, race_run.seconds
    t = time.perf_counter()
    glp = glp_stage(glp_engine, k, max_seconds=glp_budget_s)
    glp_run_s = time.perf_counter() - t
    complete = len(glp.path) == k
    total_evals = glp_evaluations(num_layers, k)
    glp_s = glp_run_s if complete else glp_run_s / glp.evaluations * total_evals
    comflp_s = measure_s + coarse_s + fine_s
    row = {"layers": num_layers, "k": k, "measure_s": measure_s, "coarse_s": coarse_s, "fine_s": fine_s,
           "fine_race_s": race_s, "race_decodes": sum(raced.decoded), "full_decodes": len(subset) * len(cands),
           "race_same_pick": raced.best.pruned == full.best.pruned, "glp_s": glp_s, "glp_extrapolated": not complete,
           "glp_evaluations": total_evals, "glp_evaluations_run": glp.evaluations, "comflp_s": comflp_s,
           "comflp_race_s": measure_s + coarse_s + race_s, "speedup": glp_s / comflp_s,
           "speedup_race": glp_s / (measure_s + coarse_s + race_s)}
    flag = " (extrapolated)" if not complete else ""
    print(f"L={num_layers:>3} K={k:>2}: measure {measure_s:6.2f} s, coarse {1000 * coarse_s:7.1f} ms, fine {fine_s:6.2f} s "
          f"(race {race_s:6.2f} s), GLP {glp_s:8.1f} s{flag} over {total_evals} evaluations; "
          f"GLP/CoMFLP {row['speedup']:.1f}x ({row['speedup_race']:.1f}x racing)", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    depths = [r["layers"] for r in rows]
    series = {label: (depths, [r[key] for r in rows]) for key, label in [
        ("measure_s", "measuring (DC)"), ("coarse_s", "coarse (exact top-10)"), ("fine_s", "fine (10 candidates)"),
        ("fine_race_s", "fine, racing"), ("comflp_s", "CoMFLP total")]}
    ran = [r for r in rows if not r["glp_extrapolated"]]
    series["GLP"] = ([r["layers"] for r in ran], [r["glp_s"] for r in ran])
    styles = {"GLP": {"marker": "s", "color": "k"}}
    extra = [r for r in rows if r["glp_extrapolated"]]
    if extra:
        joined = ran[-1:] + extra
        series["GLP (extrapolated)"] = ([r["layers"] for r in joined], [r["glp_s"] for r in joined])
        styles["GLP (extrapolated)"] = {"marker": "s", "color": "k", "ls": "--", "mfc": "none"}
    curves(series, path, xlabel="layers L (pruning K = L/2)", ylabel="seconds", loglog=True, styles=styles,
           title="search cost against depth (random weights, width 144)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="12,24,48,96", help="comma-separated layer counts (default: %(default)s)")
    p.add_argument("--subset", type=positive_int, default=64, help="fine-search utterances of the dev split (default: %(default)s)")
    p.add_argument("--glp_budget_s", type=positive_float, default=900.0,
                   help="run GLP in full while under this; extrapolate beyond (default: %(default)s)")
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "scaling.json")
    p.add_argument("--keep_rows", action="store_true",
                   help="keep the rows of other depths already in --output (each row records its own run's date)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = load_model(DEMO_MODEL_DIR, need_tokenizer=True)
    train = read_corpus(demo_split("train"), require_text=False)
    subset = verify_subset(read_corpus(demo_split("dev")), 1, args.subset)
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    if args.keep_rows and args.output.exists():
        rows = [r for r in json.loads(args.output.read_text())["rows"] if r["layers"] not in depths]
    for depth in depths:
        row = time_depth(random_model(depth, processor, args.seed), depth, train, subset, args.glp_budget_s)
        rows.append({**row, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()})
        rows.sort(key=lambda r: r["layers"])
        write_json(args.output, {"rows": rows, "subset": len(subset), "glp_budget_s": args.glp_budget_s,
                                 "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()})
    plot(rows, args.output.with_suffix(".png"))
    print(f"{args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
