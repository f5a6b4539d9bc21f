"""Whole CoMFLP search (measure + coarse + fine) vs greedy layer pruning by CER (GLP), one run.

    python bench/glp_vs_comflp.py [--model DIR] [--num_clip_layers 6]

Both search on the same fine-search subset (first 10 x 32 utterances of the dev split)
with the same shared-prefix engine; their picks are then scored on the test split.
Goal: CoMFLP >= 10x faster, its pick's test CER within 10% (relative) of GLP's.
It also measures the cost model behind the ratio (the front end's seconds, the seconds per
layer application of a batch) and the most any fine search could reach: measuring, the
front end and the winner's layers alone, and how close each fine search comes to it (CoMFLP / floor).
Writes bench/results/glp_vs_comflp.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from comflp.cli.argtypes import positive_int, threads
from comflp.atomic import write_json
from comflp.demo.corpus import read_corpus
from comflp.model import load_model
from comflp.paths import DEMO_MODEL_DIR, REPO_ROOT, demo_split
from comflp.stages import comflp_search
from comflp.stages import fine as fine_stage
from comflp.stages import glp as glp_stage
from comflp.stages import measure as measure_stage
from comflp.verify import FineSearch, verify_subset


def trie_nodes(pruned_sets: list[list[int]], num_layers: int) -> int:
    """Layer applications per batch of a shared-prefix fine search of these pruned sets: the distinct
    prefixes of their kept-layer sequences (each runs once per batch, comflp.verify).

    >>> trie_nodes([[1], [2]], 3), trie_nodes([[3], [2]], 3)
    (4, 3)
    """
    kept = [tuple(i for i in range(1, num_layers + 1) if i not in set(p)) for p in pruned_sets]
    return len({k[: j + 1] for k in kept for j in range(len(k))})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--num_clip_layers", type=positive_int, default=6)
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "glp_vs_comflp.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.num_clip_layers
    loaded = load_model(args.model, need_tokenizer=True)
    train = read_corpus(demo_split("train"), require_text=False)
    subset = verify_subset(read_corpus(demo_split("dev")), 10, 32)
    # one engine per timed search, audio loaded outside the timers: each pays for its own front-end outputs
    full_engine, race_engine, glp_engine = (FineSearch(loaded, subset, batch_size=32, progress=False)
                                            for _ in range(3))

    # warm-up outside the timers, as the engines load their audio outside them: torch's first calls and the
    # measuring utterances' first reads from disk would otherwise fall on whichever search runs first
    FineSearch(loaded, subset[:32], batch_size=32, progress=False).evaluate([[]])
    measure_stage(loaded, train)
    run = comflp_search(loaded, train, full_engine, k, racing=False)
    measure_s, coarse_s, comflp_s = run.measured.seconds, run.coarse.seconds, run.seconds
    comflp_pick, report = run.best, run.fine.report
    coarse = run.coarse.candidates
    race_run = fine_stage(race_engine, coarse, racing=True)
    raced, race_s = race_run.report, race_run.seconds
    comflp_race_s = measure_s + coarse_s + race_s

    t = time.perf_counter()
    glp = glp_stage(glp_engine, k)
    glp_s = time.perf_counter() - t
    glp_pick = glp.path[-1]

    # The cost model behind the ratio: the full model decoded on a cold engine (front end + L layers per batch),
    # then again on the same engine (front end kept: layers only).
    probe = FineSearch(loaded, subset, batch_size=32, progress=False)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        probe.evaluate([[]])
        times.append(time.perf_counter() - t)
    num_batches = len(probe.batches)
    front_end_s = max(times[0] - times[1], 0.0)
    layer_s = times[1] / (probe.num_layers * num_batches)  # per layer application of one batch
    comflp_apps, glp_apps = full_engine.stats.layer_applications, glp_engine.stats.layer_applications
    floor_s = measure_s + coarse_s + front_end_s + (probe.num_layers - k) * num_batches * layer_s
    print(f"cost model: front end {front_end_s:.2f} s, {1000 * layer_s:.1f} ms per layer application of a batch; "
          f"CoMFLP's fine search {comflp_apps} applications (model {front_end_s + comflp_apps * layer_s:.2f} s, "
          f"measured {comflp_s - measure_s - coarse_s:.2f} s), GLP {glp_apps} (model "
          f"{front_end_s + glp_apps * layer_s:.2f} s, measured {glp_s:.2f} s); a fine search that decoded only "
          f"its winner would cost {floor_s:.2f} s with measuring: GLP / CoMFLP <= {glp_s / floor_s:.1f}x")

    # How close each fine search comes to that floor, and why racing stops where it does: the candidates it
    # could not drop are decoded on the whole subset, and their kept-layer trie is what that costs at least.
    survivors = [c.pruned for c, d in zip(raced.candidates, raced.decoded) if d == len(subset)]
    survivor_apps = trie_nodes(survivors, probe.num_layers) * num_batches
    survivor_floor_s = measure_s + coarse_s + front_end_s + survivor_apps * layer_s
    cers = [c.cer for c, d in zip(report.candidates, raced.decoded) if d == len(subset)]
    print(f"CoMFLP / floor: {comflp_s / floor_s:.2f} full evaluation, {comflp_race_s / floor_s:.2f} racing "
          f"(goal <= 1.3); the race kept {len(survivors)} of {len(coarse)} candidates to the end (subset CERs "
          f"{100 * min(cers):.2f}-{100 * max(cers):.2f}%, not separable at confidence {race_run.confidence}); "
          f"decoding those alone costs {survivor_floor_s:.2f} s ({survivor_apps} layer applications): "
          f"racing / that = {comflp_race_s / survivor_floor_s:.2f}")

    test = FineSearch(loaded, read_corpus(demo_split("test")), batch_size=32, progress=False)
    comflp_test, glp_test = (r.rate for r in test.evaluate([comflp_pick.pruned, glp_pick.pruned]))
    speedup = glp_s / comflp_s
    rel = (comflp_test - glp_test) / glp_test if glp_test > 0 else 0.0
    print(f"{'':<8} {'seconds':>8} {'pick':<28} {'dev-subset CER':>15} {'test CER':>9}")
    print(f"{'CoMFLP':<8} {comflp_s:>8.2f} {str(comflp_pick.pruned):<28} {100 * comflp_pick.cer:>14.2f}% {100 * comflp_test:>8.2f}%")
    print(f"{'GLP':<8} {glp_s:>8.2f} {str(glp_pick.pruned):<28} {100 * glp_pick.cer:>14.2f}% {100 * glp_test:>8.2f}%")
    print(f"CoMFLP: measure {measure_s:.2f} s + coarse {coarse_s * 1000:.1f} ms + fine {comflp_s - measure_s - coarse_s:.2f} s")
    print(f"racing fine search: {race_s:.2f} s, {sum(raced.decoded)} of {len(subset) * len(coarse)} decodes, "
          f"pick {raced.best.pruned} ({'same as' if raced.best.pruned == comflp_pick.pruned else 'DIFFERENT from'} "
          f"full evaluation); speed-up with racing {glp_s / comflp_race_s:.1f}x")
    print(f"speed-up {speedup:.1f}x (goal >= 10); test CER of CoMFLP's pick vs GLP's: {100 * rel:+.1f}% relative "
          f"(goal within 10%)")
    write_json(args.output, {
        "model": str(args.model), "k": k, "comflp_seconds": comflp_s, "measure_seconds": measure_s,
        "coarse_seconds": coarse_s, "glp_seconds": glp_s, "speedup": speedup, "glp_evaluations": glp.evaluations,
        "comflp_pick": comflp_pick.pruned, "glp_pick": glp_pick.pruned, "comflp_subset_cer": comflp_pick.cer,
        "glp_subset_cer": glp_pick.cer, "comflp_test_cer": comflp_test, "glp_test_cer": glp_test,
        "relative_cer_difference": rel, "race_seconds": race_s, "comflp_race_seconds": comflp_race_s,
        "speedup_race": glp_s / comflp_race_s, "race_pick": raced.best.pruned,
        "race_decodes": sum(raced.decoded), "full_decodes": len(subset) * len(coarse), "pearson_score_cer": report.pearson,
        "front_end_seconds": front_end_s, "layer_application_seconds": layer_s, "comflp_layer_applications": comflp_apps,
        "glp_layer_applications": glp_apps, "floor_seconds": floor_s, "speedup_bound": glp_s / floor_s,
        "comflp_over_floor": comflp_s / floor_s, "comflp_race_over_floor": comflp_race_s / floor_s,
        "race_layer_applications": race_engine.stats.layer_applications, "race_survivors": survivors,
        "survivor_layer_applications": survivor_apps, "survivor_floor_seconds": survivor_floor_s,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine()})


if __name__ == "__main__":
    main()
