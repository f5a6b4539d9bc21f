"""Fine search of 10 candidates for 12 -> 6: shared prefixes vs rebuilding each pruned model, one run.

    python bench/verify.py [--model DIR] [--verify_data_dir DIR] [--test_num_batch 10] [--verify_batch_size 32]

The candidates are the exact (= exhaustive) top-10 on the model's own DC matrix (batch 4 x 10,
measured here). Reports layer applications and wall time of both, checks that the
CERs are identical, and writes bench/results/verify.json. Goal: time ratio <= 0.4.
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
from comflp.stages import coarse, measure
from comflp.verify import FineSearch, evaluate_separately, verify_subset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--verify_data_dir", type=Path, default=demo_split("dev"))
    p.add_argument("--measure_data_dir", type=Path, default=demo_split("train"))
    p.add_argument("--test_num_batch", type=positive_int, default=10)
    p.add_argument("--verify_batch_size", type=positive_int, default=32)
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "verify.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, need_tokenizer=True)
    measured = measure(loaded, read_corpus(args.measure_data_dir, require_text=False), progress=False)
    sets = [c.pruned for c in coarse(measured.matrices["dc"], 6).candidates]
    utts = verify_subset(read_corpus(args.verify_data_dir), args.test_num_batch, args.verify_batch_size)

    t = time.perf_counter()
    fine = FineSearch(loaded, utts, batch_size=args.verify_batch_size, progress=False)
    shared = fine.evaluate(sets)
    shared_s = time.perf_counter() - t
    t = time.perf_counter()
    naive, _ = evaluate_separately(loaded, utts, sets, batch_size=args.verify_batch_size)
    naive_s = time.perf_counter() - t
    identical = [r.rate for r in shared] == [r.rate for r in naive]
    batches = -(-len(utts) // args.verify_batch_size)
    naive_apps = batches * sum(12 - len(s) for s in sets)
    print(f"{len(sets)} candidates, {len(utts)} utterances in {batches} batches of {args.verify_batch_size}")
    print(f"{'':<28} {'layer applications':>18} {'seconds':>9}")
    print(f"{'shared prefixes (comflp)':<28} {fine.stats.layer_applications:>18} {shared_s:>9.2f}")
    print(f"{'rebuild and run each':<28} {naive_apps:>18} {naive_s:>9.2f}")
    print(f"ratio: applications {fine.stats.layer_applications / naive_apps:.3f}, time {shared_s / naive_s:.3f} "
          f"(goal <= 0.4); CERs identical: {identical}")
    write_json(args.output, {
        "model": str(args.model), "candidates": sets, "utterances": len(utts), "batch_size": args.verify_batch_size,
        "shared_layer_applications": fine.stats.layer_applications, "naive_layer_applications": naive_apps,
        "shared_seconds": shared_s, "naive_seconds": naive_s, "time_ratio": shared_s / naive_s,
        "cers": [r.rate for r in shared], "identical": identical, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine()})


if __name__ == "__main__":
    main()
