"""Measure maths vs the forward pass that feeds it, side by side in one run.

    python bench/measures.py [--model DIR] [--batch_size 32] [--iter_num 10] [--mode U|T]

For a 12-layer model (13 hidden states): the forward passes with hidden-state
capture are timed apart from all the statistics and matrices of every measure
(dc, dc_unbiased, cka_unbiased per batch; svcca, pwcca, cka streamed; cosine,
angular). Goal: maths <= 10% of the forward.

Then the whole measuring pass (``comflp.hidden.collect``: audio loading,
batch-invariant forward, statistics, final matrices) of the paper's SVCCA
command (``svcca_analysis.py --batch_size 32 --mode U``, fewer iterations) is
timed against the bare forward passes over the same batches, audio loading
excluded from the latter. Goal: whole / forward <= 1.3.
Writes bench/results/measures.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from comflp.cli.argtypes import positive_int, threads
from comflp.atomic import write_json
from comflp.data import collate
from comflp.model import forward, layer_frame_mask
from comflp.demo.corpus import read_corpus
from comflp.hidden import (ALL_MEASURES, MeasureSettings, Statistics, capture_layer_states, collect, finalize, pool,
                           select_utterances, update, update_per_batch)
from comflp.model import load_model, num_layers
from comflp.paths import DEMO_MODEL_DIR, REPO_ROOT, demo_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--data_dir", type=Path, default=demo_split("train"))
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--iter_num", type=positive_int, default=10)
    p.add_argument("--mode", choices=["U", "T"], default="U")
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--whole_iter_num", type=positive_int, default=20,
                   help="batches of 32 in the whole-pass comparison (the paper's command used 300)")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "measures.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model
    settings = MeasureSettings(measures=ALL_MEASURES, batch_size=args.batch_size, iter_num=args.iter_num,
                               sample_mode=args.mode)
    utts = select_utterances(read_corpus(args.data_dir, require_text=False), settings)
    batches = [collate(utts[i: i + args.batch_size], loaded.feature_extractor)
               for i in range(0, len(utts), args.batch_size)]
    stats = Statistics()
    forward_s = maths_s = 0.0
    with torch.inference_mode(), capture_layer_states(model) as states:
        forward(model, batches[0].inputs, batches[0].attention_mask)  # warm-up
        for batch in batches:
            t = time.perf_counter()
            forward(model, batch.inputs, batch.attention_mask)
            forward_s += time.perf_counter() - t
            t = time.perf_counter()
            mask = layer_frame_mask(model, batch.attention_mask, states[0].shape[1])
            stats.num_utterances += mask.shape[0]
            stats.num_frames += int(mask.sum())
            pooled = pool(states, mask)
            update(stats, states, mask, settings, pooled)
            update_per_batch(stats, pooled, settings)
            maths_s += time.perf_counter() - t
        t = time.perf_counter()
        matrices = finalize(stats, settings)
        finalize_s = time.perf_counter() - t
    total_maths = maths_s + finalize_s
    ratio = total_maths / forward_s
    print(f"model {args.model}: {num_layers(model)} layers, {len(utts)} utterances in {len(batches)} batches, "
          f"mode {args.mode}, {stats.num_frames} frames")
    print(f"forward passes           {forward_s:8.3f} s")
    print(f"per-batch statistics     {maths_s:8.3f} s   ({', '.join(ALL_MEASURES)})")
    print(f"final matrices           {finalize_s:8.3f} s")
    print(f"maths / forward          {ratio:8.3f}   (goal <= 0.10)")
    whole = whole_pass(loaded, args)
    write_json(args.output, {"model": str(args.model), "utterances": len(utts), "frames": stats.num_frames,
                             "mode": args.mode, "forward_s": forward_s, "stats_s": maths_s, "finalize_s": finalize_s,
                             "ratio": ratio, "measures": list(matrices), "threads": torch.get_num_threads(),
                             "whole_pass": whole, "machine": platform.processor() or platform.machine()})


def whole_pass(loaded, args: argparse.Namespace) -> dict:
    """collect() end to end against bare forward passes over the same (pre-loaded) batches."""
    settings = MeasureSettings(measures=("svcca",), batch_size=32, iter_num=args.whole_iter_num, sample_mode="U")
    utts = select_utterances(read_corpus(args.data_dir, require_text=False), settings)
    t = time.perf_counter()
    batches = [collate(utts[i: i + 32], loaded.feature_extractor) for i in range(0, len(utts), 32)]
    load_s = time.perf_counter() - t
    with torch.inference_mode():
        forward(loaded.model, batches[0].inputs, batches[0].attention_mask)  # warm-up
        t = time.perf_counter()
        for batch in batches:
            forward(loaded.model, batch.inputs, batch.attention_mask)
        bare_s = time.perf_counter() - t
    t = time.perf_counter()
    collect(loaded.model, loaded.feature_extractor, utts, settings, progress=False)
    whole_s = time.perf_counter() - t
    ratio = whole_s / bare_s
    print(f"whole svcca pass, {len(utts)} utterances: {whole_s:.2f} s; bare forward {bare_s:.2f} s; "
          f"audio loading alone {load_s:.2f} s; whole / forward {ratio:.3f}   (goal <= 1.3)")
    return {"utterances": len(utts), "whole_s": whole_s, "bare_forward_s": bare_s, "audio_load_s": load_s,
            "ratio": ratio}


if __name__ == "__main__":
    main()
