"""Fine search of a speech-LLM's LLM layers: one audio-tower pass per batch shared by every candidate and the
prompt's prefill shared along kept-layer prefixes (comflp) vs each pruned model decoding alone (its own tower
pass and whole prefill), side by side in one run.

    python bench/speechllm_fine.py [--model models/demo-speechllm] [--verify_data_dir DIR] [--test_num_batch 4]
                                   [--verify_batch_size 16] [--threads N]

The candidates are every set of 1 and of 2 of the LLM's layers; both sides decode with the same cap on new
tokens (the fine search's). Reports the wall time of both, checks that the transcripts are identical, and
writes bench/results/speechllm_fine.json.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import torch

from comflp.atomic import write_json
from comflp.cli.argtypes import positive_int, threads
from comflp.data import iter_batches
from comflp.demo.corpus import read_corpus
from comflp.heads import decode_batch
from comflp.model import load_model, num_layers, prune
from comflp import prefill
from comflp.paths import REPO_ROOT, demo_split
from comflp.verify import FineSearch, verify_subset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO_ROOT / "models" / "demo-speechllm"))
    p.add_argument("--verify_data_dir", type=Path, default=demo_split("dev"))
    p.add_argument("--test_num_batch", type=positive_int, default=4)
    p.add_argument("--verify_batch_size", type=positive_int, default=16)
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "speechllm_fine.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, allow_encoder_decoder=True, need_tokenizer=True)
    depth = num_layers(loaded.model, "decoder")
    sets = [list(s) for k in (1, 2) for s in itertools.combinations(range(1, depth + 1), k)]
    utts = verify_subset(read_corpus(args.verify_data_dir), args.test_num_batch, args.verify_batch_size)

    prefills: list[prefill.PromptPrefills] = []  # one per batch: how many prefill layers were replayed
    made = prefill.PromptPrefills.__init__

    def counted(self, *a, **k):
        made(self, *a, **k)
        prefills.append(self)

    prefill.PromptPrefills.__init__ = counted
    t = time.perf_counter()
    fine = FineSearch(loaded, utts, batch_size=args.verify_batch_size, progress=False, stack="decoder")
    shared = fine.transcribe(sets)
    shared_s = time.perf_counter() - t
    prefill.PromptPrefills.__init__ = made
    replayed = sum(p.replayed_layers for p in prefills)
    computed = sum(p.computed_layers for p in prefills)

    t = time.perf_counter()
    alone = []
    for pruned in sets:
        model = prune(loaded.model, [], decoder_pruned=pruned)
        hyps: dict[str, str] = {}
        with torch.inference_mode():
            for batch in iter_batches(utts, loaded.feature_extractor, batch_size=args.verify_batch_size):
                hyps.update(zip(batch.utt_ids, decode_batch(model, loaded.tokenizer, batch,
                                                            max_new_tokens=fine.max_new_tokens)))
        alone.append([fine.normalize(hyps[u.utt_id]) for u in utts])
    alone_s = time.perf_counter() - t
    identical = shared == alone
    batches = -(-len(utts) // args.verify_batch_size)
    print(f"{len(sets)} LLM candidates of a {depth}-layer LLM, {len(utts)} utterances in {batches} batches of "
          f"{args.verify_batch_size}, at most {fine.max_new_tokens} new tokens")
    print(f"{'':<38} {'tower passes':>12} {'seconds':>9}")
    print(f"{'one tower pass per batch (comflp)':<38} {batches:>12} {shared_s:>9.2f}")
    print(f"{'each pruned model alone':<38} {batches * len(sets):>12} {alone_s:>9.2f}")
    print(f"prompt prefill layer applications: {computed} computed, {replayed} replayed "
          f"(of {computed + replayed})")
    print(f"time ratio {shared_s / alone_s:.3f}; transcripts identical: {identical}")
    write_json(args.output, {
        "model": args.model, "candidates": sets, "utterances": len(utts), "batch_size": args.verify_batch_size,
        "max_new_tokens": fine.max_new_tokens, "shared_seconds": shared_s, "alone_seconds": alone_s,
        "ratio": shared_s / alone_s, "identical": identical, "prefill_layers_computed": computed,
        "prefill_layers_replayed": replayed, "threads": torch.get_num_threads(),
        "machine": platform.platform()})
    if not identical:
        raise SystemExit("the shared-prefix fine search transcribed differently from the separately pruned models")


if __name__ == "__main__":
    main()
