"""Deployment: decode speed and error rate of full and pruned models in PyTorch and in the runtimes
``comflp export`` writes for, side by side in one run.

    python bench/deploy.py [--threads 2] [--batch_size 8] [--repeats 3]

- **CTC, demo-12l** (Mandarin test split, 200 utterances): the full model and CoMFLP's 12 -> 6 pick healed
  (``bench/repair.py --heal_epochs 3``'s unrepaired run: distillation, 3 epochs, average of 2), each in
  PyTorch fp32 (comflp's batch-invariant forward), ONNX Runtime fp32 and ONNX Runtime int8 (dynamic
  quantisation), all from ``comflp.export``.
- **Whisper, the real tiny.en** (the first ``--whisper_utts`` 100 of the English test split): the full model and decoder layer 2 removed and healed
  (``bench/real_whisper.py evidence``'s run), in PyTorch fp32 (greedy generation with the cache) and
  CTranslate2 fp32 and int8. The demo Whisper cannot go to CTranslate2: its character vocabulary has no
  ``<|notimestamps|>``, and CTranslate2 would read its characters as timestamps (``comflp export`` refuses it).

Each variant decodes the same pre-loaded batches (features computed once, before timing); after one warm-up
batch each, the variants of a model family alternate for ``--repeats`` passes and the best pass counts.
RTF = decode seconds / audio seconds; speed-up = full PyTorch RTF / RTF. Exports are written under
``--work`` and reused when present. Writes bench/results/deploy.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from comflp.atomic import write_json
from comflp.cli.argtypes import positive_int, threads
from comflp.cli.options import corpus_split
from comflp.demo.corpus import read_corpus
from comflp.paths import REPO_ROOT

CACHE = Path(os.environ.get("COMFLP_CACHE", Path.home() / ".cache" / "comflp"))
HEALED_CTC = REPO_ROOT / "exp" / "bench_repair" / "heal-none-3" / "model_avg"
HEALED_WHISPER = CACHE / "real-whisper-work" / "heal-decoder-2" / "model_avg"


def _export(loaded, out: Path, fmt: str, quantization: str, utts) -> dict:
    """``comflp.export`` of ``loaded`` into ``out`` (checked on ``utts``) unless done earlier; the check."""
    import json

    from comflp.artifacts import EXPORT_FILE
    from comflp.export import export

    record = out / EXPORT_FILE
    if not record.is_file():
        export(loaded, out, fmt=fmt, quantization=quantization, check_utts=utts, batch_size=8, overwrite=True,
               data="test")
    return json.loads(record.read_text())["check"]


def _race(variants: dict, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per variant (each a no-argument callable decoding every batch), alternating
    variants within each pass after one warm-up call each."""
    for run in variants.values():
        run(warm_up=True)
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def ctc_rows(args) -> list[dict]:
    from comflp.data import iter_batches
    from comflp.heads import decode_logits
    from comflp.export import ONNX_FILE, onnx_logits, onnx_session
    from comflp.model import forward, load_model

    utts = read_corpus(corpus_split(None, "test", None))
    variants, texts, meta = {}, {}, {}
    for label, source in (("demo-12l", REPO_ROOT / "models" / "demo-12l"), ("demo-12l pruned to 6, healed", HEALED_CTC)):
        if not source.is_dir():
            raise SystemExit(f"error: {source} not found: run python bench/repair.py --rows demo-12l --heal_epochs 3")
        loaded = load_model(source, need_tokenizer=True)
        batches = list(iter_batches(utts, loaded.feature_extractor, batch_size=args.batch_size))
        audio = sum(float(b.lengths.sum()) for b in batches) / loaded.sampling_rate
        kind = loaded.model.main_input_name
        tag = "full" if label == "demo-12l" else "pruned"
        checks = {q: _export(loaded, args.work / f"{tag}-onnx-{q}", "onnx", q, utts) for q in ("none", "int8")}
        sessions = {q: onnx_session(args.work / f"{tag}-onnx-{q}" / ONNX_FILE) for q in ("none", "int8")}

        def pytorch(loaded=loaded, batches=batches, key=f"{label}|PyTorch fp32", warm_up=False) -> None:
            out = []
            with torch.inference_mode():
                for b in batches[:1] if warm_up else batches:
                    out += decode_logits(loaded.model, loaded.tokenizer,
                                         forward(loaded.model, b.inputs, b.attention_mask).logits, b.attention_mask)
            if not warm_up:
                texts[key] = out

        def onnx(q, loaded=loaded, batches=batches, kind=kind, label=label, sessions=sessions,
                 warm_up=False) -> None:
            out = []
            for b in batches[:1] if warm_up else batches:
                out += decode_logits(loaded.model, loaded.tokenizer, onnx_logits(sessions[q], b, kind),
                                     b.attention_mask)
            if not warm_up:
                texts[f"{label}|ONNX Runtime {'fp32' if q == 'none' else q}"] = out

        variants[f"{label}|PyTorch fp32"] = pytorch
        variants[f"{label}|ONNX Runtime fp32"] = lambda warm_up=False, f=onnx: f("none", warm_up=warm_up)
        variants[f"{label}|ONNX Runtime int8"] = lambda warm_up=False, f=onnx: f("int8", warm_up=warm_up)
        meta[label] = _meta(batches, audio, checks, loaded, None)
    return _table(_race(variants, args.repeats), "demo-12l|PyTorch fp32", meta, texts, unit="char", runtime="ONNX")


def whisper_rows(args) -> list[dict]:
    import ctranslate2

    from comflp.data import iter_batches
    from comflp.heads import generate_batch, generation_limit, word_normalizer
    from comflp.export import ct2_generate_batch
    from comflp.prompt import Prompt, prefix_ids

    real = _sibling("real_whisper")
    tiny_en = real.converted()
    from comflp.model import load_model

    utts = None
    variants, texts, meta = {}, {}, {}
    for label, source in (("tiny.en", tiny_en), ("tiny.en decoder layer 2 removed, healed", HEALED_WHISPER)):
        if not source.is_dir():
            raise SystemExit(f"error: {source} not found: run python bench/real_whisper.py evidence")
        loaded = load_model(source, need_tokenizer=True, allow_encoder_decoder=True)
        utts = utts or read_corpus(corpus_split(None, "test", loaded))[: args.whisper_utts]
        batches = list(iter_batches(utts, loaded.feature_extractor, batch_size=args.batch_size))
        audio = sum(float(b.lengths.sum()) for b in batches) / loaded.sampling_rate
        limit = generation_limit(loaded.model, loaded.tokenizer, [u.text for u in utts])
        tag = "full" if label == "tiny.en" else "pruned"
        checks = {q: _export(loaded, args.work / f"{tag}-ct2-{q}", "ct2", q, utts) for q in ("none", "int8")}
        prompt = loaded.tokenizer.convert_ids_to_tokens(prefix_ids(loaded.model, Prompt()))
        models = {q: ctranslate2.models.Whisper(str(args.work / f"{tag}-ct2-{q}"), device="cpu",
                                                intra_threads=torch.get_num_threads()) for q in ("none", "int8")}

        def pytorch(loaded=loaded, batches=batches, limit=limit, key=f"{label}|PyTorch fp32", warm_up=False) -> None:
            out = []
            with torch.inference_mode():
                for b in batches[:1] if warm_up else batches:
                    out += generate_batch(loaded.model, loaded.tokenizer, b, max_new_tokens=limit)
            if not warm_up:
                texts[key] = out

        def ct2(q, loaded=loaded, batches=batches, prompt=prompt, limit=limit, label=label,
                models=models, warm_up=False) -> None:
            out = []
            for b in batches[:1] if warm_up else batches:
                out += ct2_generate_batch(models[q], loaded, b, [prompt] * len(b.utt_ids), limit)
            if not warm_up:
                texts[f"{label}|CTranslate2 {'fp32' if q == 'none' else q}"] = out

        variants[f"{label}|PyTorch fp32"] = pytorch
        variants[f"{label}|CTranslate2 fp32"] = lambda warm_up=False, f=ct2: f("none", warm_up=warm_up)
        variants[f"{label}|CTranslate2 int8"] = lambda warm_up=False, f=ct2: f("int8", warm_up=warm_up)
        meta[label] = _meta(batches, audio, checks, loaded, word_normalizer(loaded.model, loaded.tokenizer))
    return _table(_race(variants, args.repeats), "tiny.en|PyTorch fp32", meta, texts, unit="word",
                  runtime="CTranslate2")


def _meta(batches, audio: float, checks: dict, loaded, normalizer) -> dict:
    config = loaded.model.config
    layers = ([config.encoder_layers, config.decoder_layers] if hasattr(config, "decoder_layers")
              else config.num_hidden_layers)
    return {"ids": [i for b in batches for i in b.utt_ids], "refs": [t for b in batches for t in b.texts],
            "audio": audio, "checks": checks, "layers": layers, "normalizer": normalizer}


def _table(seconds: dict[str, float], base_key: str, meta: dict, texts: dict, *, unit: str, runtime: str) -> list[dict]:
    """One row per variant: RTF, speed-up over ``base_key``, error rate, and the check of the export it ran."""
    from comflp.decode import Transcription

    rows = []
    for key, s in seconds.items():
        label, name = key.split("|")
        m = meta[label]
        rate = Transcription(m["ids"], m["refs"], texts[key], m["audio"], s, normalizer=m["normalizer"]).score(unit)
        rows.append({"model": label, "runtime": name, "seconds": s, "rtf": s / m["audio"],
                     "speedup": seconds[base_key] / s, "error_rate": rate.rate, "unit": unit, "layers": m["layers"],
                     "export_check": m["checks"]["int8" if "int8" in name else "none"] if runtime in name else None})
    return rows


def _sibling(name: str):
    """A sibling bench script loaded by path (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=threads, default=None, help="torch, ONNX Runtime and CTranslate2 threads")
    p.add_argument("--batch_size", type=positive_int, default=8, help="utterances per batch (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes per variant (default: %(default)s)")
    p.add_argument("--rows", choices=["all", "ctc", "whisper"], default="all",
                   help="which table to run (a partial run rewrites the results file with its rows only)")
    p.add_argument("--whisper_utts", type=positive_int, default=100,
                   help="Whisper rows: the first N test utterances (generation is slow on 2 cores; "
                        "default: %(default)s)")
    p.add_argument("--work", type=Path, default=REPO_ROOT / "exp" / "bench_deploy", help="where the exports go")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "deploy.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.rows in ("all", "ctc"):
        rows += ctc_rows(args)
    if args.rows in ("all", "whisper"):
        rows += whisper_rows(args)
    write_json(args.output, {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                                         "cpus": os.cpu_count()},
                             "batch_size": args.batch_size, "repeats": args.repeats,
                             "whisper_utts": args.whisper_utts, "rows": rows})
    for r in rows:
        print(f"{r['model']:<42} {r['runtime']:<18} RTF {r['rtf']:.4f}  x{r['speedup']:.2f}  "
              f"{'CER' if r['unit'] == 'char' else 'WER'} {100 * r['error_rate']:.2f}%")


if __name__ == "__main__":
    main()
