"""Decoding throughput of a 6-layer pruned model vs its 12-layer source, side by side in one run.

    python bench/decode.py [--model DIR] [--data_dir DIR] [--layers 1,3,5,7,9,11]

Times the forward pass + greedy decoding over the same batches (audio loaded
beforehand) for the demo model and, for scale, for a randomly initialised model of
the paper's size (wav2vec2-base, vocab 4233, LayerNorm head). Goal: >= 1.8x.
Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from transformers import Wav2Vec2Config

from comflp.cli.argtypes import positive_int, threads
from comflp.atomic import write_json
from comflp.data import collate, length_sorted_batches
from comflp.model import forward, frame_mask
from comflp.demo.corpus import read_corpus
from comflp.metrics import greedy_decode
from comflp.model import ExtendedWav2Vec2ForCTC, load_model, prune
from comflp.paths import DEMO_MODEL_DIR, REPO_ROOT, demo_split
from comflp.strategy import parse_layers


@torch.inference_mode()
def throughput(model, batches, tokenizer, repeat: int) -> float:
    """Audio seconds decoded per wall-clock second (best of ``repeat`` passes)."""
    audio = sum(float(b.lengths.sum()) for b in batches) / 16000
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for b in batches:
            logits = forward(model, b.inputs, b.attention_mask).logits
            if tokenizer is not None:
                greedy_decode(logits, tokenizer, frame_mask(model, b.attention_mask, logits.shape[1]).sum(-1))
            else:
                logits.argmax(-1)
        best = min(best, time.perf_counter() - t)
    return audio / best


@torch.inference_mode()
def frontend_share(model, batches) -> float:
    """Fraction of the forward spent in the convolutional feature encoder (not touched by pruning)."""
    from comflp.model import base_model

    from comflp.model import padding_exact

    base = base_model(model)
    t = time.perf_counter()
    for b in batches:
        with padding_exact(model, b.attention_mask.sum(-1).tolist()):
            base.feature_extractor(b.inputs)
    conv = time.perf_counter() - t
    t = time.perf_counter()
    for b in batches:
        forward(model, b.inputs, b.attention_mask)
    return conv / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--data_dir", type=Path, default=demo_split("test"))
    p.add_argument("--layers", default="1,3,5,7,9,11", help="layers removed for the 6-layer model")
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--repeat", type=positive_int, default=3)
    p.add_argument("--paper_utts", type=positive_int, default=16, help="utterances for the paper-size model")
    p.add_argument("--threads", type=threads, default=None)
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "decode.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = parse_layers(args.layers)
    loaded = load_model(args.model, need_tokenizer=True)
    utts = read_corpus(args.data_dir)
    batches = [collate(g, loaded.feature_extractor) for g in length_sorted_batches(utts, batch_size=args.batch_size)]
    results = {}
    full = throughput(loaded.model, batches, loaded.tokenizer, args.repeat)
    small = throughput(prune(loaded.model, layers).eval(), batches, loaded.tokenizer, args.repeat)
    results["demo"] = {"full_audio_s_per_s": full, "pruned_audio_s_per_s": small, "speedup": small / full,
                       "conv_frontend_share": frontend_share(loaded.model, batches)}
    torch.manual_seed(0)
    paper = ExtendedWav2Vec2ForCTC(Wav2Vec2Config(vocab_size=4233)).eval()
    few = batches[-(-args.paper_utts // args.batch_size):]  # the shortest batches keep it quick
    full_p = throughput(paper, few, None, 1)
    small_p = throughput(prune(paper, layers).eval(), few, None, 1)
    results["paper_size"] = {"full_audio_s_per_s": full_p, "pruned_audio_s_per_s": small_p, "speedup": small_p / full_p,
                             "conv_frontend_share": frontend_share(paper, few)}
    print(f"{'model':<30} {'12 layers':>10} {'6 layers':>9} {'speed-up':>9} {'conv share':>11}  (audio s per s)")
    for name, key in (("demo-12l (3.4M parameters)", "demo"), ("paper size, random (97.6M)", "paper_size")):
        r = results[key]
        print(f"{name:<30} {r['full_audio_s_per_s']:>10.1f} {r['pruned_audio_s_per_s']:>9.1f} {r['speedup']:>8.2f}x "
              f"{100 * r['conv_frontend_share']:>10.0f}%")
    write_json(args.output, {**results, "layers_removed": layers, "threads": torch.get_num_threads(),
                             "machine": platform.processor() or platform.machine()})


if __name__ == "__main__":
    main()
