"""``comflp info`` and ``comflp prune``: describe a model; remove layers and save it for plain transformers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import exit_on_error
from ..paths import DEMO_MODEL_DIR
from .argtypes import positive_int
from .options import (add_quiet, ArgumentParser, add_device, add_overwrite, add_pad_audio, add_prompt, add_repair, add_threads,
                      apply_threads, command_line, fit_repair_from_flags, resolve_device, resolve_prompt)


def info_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="comflp info", description="Describe a CTC speech model.")
    p.add_argument("model", nargs="?", default=str(DEMO_MODEL_DIR),
                   help="local model dir or hub id (default: the embedded demo model)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


@exit_on_error
def info_main(argv: list[str] | None = None) -> None:
    from ..model import load_model, model_info

    args = info_parser().parse_args(argv)
    info = model_info(load_model(args.model, need_features=False, allow_encoder_decoder=True))
    if args.json:
        print(json.dumps(info.to_dict()))
    else:
        for key, value in info.to_dict().items():
            print(f"{key:>15}: {value:,}" if isinstance(value, int) else f"{key:>15}: {value}")


def prune_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="comflp prune",
        description="Remove transformer layers from a CTC, encoder-decoder (Whisper, Moonshine) or speech-LLM "
                    "model and save it in HuggingFace format (config + model.safetensors + processor files); plain "
                    "transformers loads the result.")
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="source model dir or hub id (default: the demo model)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layers", help="1-based layers to remove, e.g. 1,3,5 or 2-4 (of an encoder-decoder model: "
                                        "its encoder's)")
    which.add_argument("--strategy", type=Path, help="strategy JSON written by the search")
    p.add_argument("--rank", type=positive_int, default=1, help="with --strategy: which candidate, 1 = best (default: %(default)s)")
    p.add_argument("--decoder_layers", default=None,
                   help="encoder-decoder models (Whisper): 1-based decoder layers to remove, e.g. 2,3 (the config's "
                        "decoder_layers, the cache indices and generation_config.alignment_heads follow)")
    p.add_argument("--output", type=Path, required=True,
                   help="output dir; must not exist, or be empty, or be an earlier comflp output with --overwrite")
    add_overwrite(p, "output dir")
    p.add_argument("--fp16", action="store_true", help="store weights as float16")
    add_repair(p)
    add_prompt(p)
    add_pad_audio(p)
    add_device(p)
    add_threads(p)
    add_quiet(p, "no progress bar while calibrating")
    return p


@exit_on_error
def prune_main(argv: list[str] | None = None) -> None:
    from ..artifacts import claim_dir
    from ..errors import ComflpError
    from ..model import load_model, num_layers
    from ..modelcard import strategy_source
    from ..stages import prune
    from ..strategy import StrategyFile, parse_layers, resolve_pruned

    parser = prune_parser()
    args = parser.parse_args(argv)
    if args.layers is None and args.strategy is None and args.decoder_layers is None:
        raise ComflpError("say which layers to prune: --strategy FILE [--rank N] or --layers 1,3,5 "
                          "(and --decoder_layers for an encoder-decoder model)")
    decoder = parse_layers(args.decoder_layers) if args.decoder_layers is not None else []
    strategy = StrategyFile.load(args.strategy) if args.strategy is not None else None
    stack = strategy.stack if strategy is not None else "encoder"
    ranked_after = (strategy.meta.get("repair") or {}).get("kind") if strategy is not None else None
    if ranked_after and ranked_after != args.repair:
        print(f"warning: {args.strategy} ranked its candidates after --repair {ranked_after}; this prune uses "
              f"--repair {args.repair}, so the model is not the one ranked", file=sys.stderr)
    if stack == "decoder" and args.decoder_layers is not None:
        raise ComflpError(f"{args.strategy} prunes the decoder: drop --decoder_layers")
    claim_dir(args.output, overwrite=args.overwrite)  # before the slow part
    repairing = args.repair != "none"
    if not repairing:
        given = [f for f in ("calib_data_dir", "calib_utts", "calib_batch_size", "calib_seed", "repair_ridge",
                             "language", "task", "pad_audio")
                 if getattr(args, f) != prune_parser().get_default(f)]
        if given:
            raise ComflpError(f"--{given[0]} sets up a repair: give --repair affine or linear with it")
    apply_threads(args.threads)
    loaded = load_model(args.model, need_features=repairing, allow_encoder_decoder=True, need_tokenizer=False,
                        device=resolve_device(args.device) if repairing else "cpu")
    total = num_layers(loaded.model)
    layers = ([] if args.layers is None and args.strategy is None else
              resolve_pruned(num_layers(loaded.model, stack), strategy=args.strategy, rank=args.rank,
                             layers=args.layers, model_name=args.model))
    if stack == "decoder":
        layers, decoder = [], layers
    fitted = None
    if repairing:
        from ..heads import check_prompt

        prompt = check_prompt(loaded.model, resolve_prompt(args))  # a CTC model has no prompt: refused, not ignored
        fitted = fit_repair_from_flags(args, loaded, prompt, layers=layers, decoder_layers=decoder)
    loaded.model.to("cpu")
    out = prune(loaded, layers, args.output, decoder_layers=decoder, fp16=args.fp16, overwrite=args.overwrite,
                repair=fitted, strategy=strategy_source(strategy, args.strategy, args.rank) if strategy else None,
                command=command_line(parser, argv))
    if fitted is not None:
        for m in fitted.maps:
            print(f"repaired {m.cut.stack} block {list(m.cut.block)} at {m.site_path}: R² {m.r2:.4f} "
                  f"(unrepaired {m.r2_unrepaired:.4f})")
        for s in fitted.skipped:
            print(f"left {s.cut.stack} block {list(s.cut.block)} unrepaired: {s.reason}")
    print(f"{pruned_summary(out, total, num_layers(loaded.model, 'decoder') if out.decoder_layers is not None else None)}"
          f", saved to {args.output}")


def pruned_summary(out, encoder_total: int, decoder_total: int | None) -> str:
    """What was removed from which stack: "pruned layers [1, 3] of 12: 10 layers left" for a CTC model; for an
    encoder-decoder model each stack that lost layers, and the depths left."""
    extra = f" with {len(out.adapter_files)} adapter file(s)" if out.adapter_files else ""
    if decoder_total is None:
        return f"pruned layers {out.removed} of {encoder_total}: {out.num_layers} layers left{extra}"
    removed = [f"{stack} layers {layers} of {total}" for stack, layers, total in
               (("encoder", out.removed, encoder_total), ("decoder", out.decoder_removed, decoder_total)) if layers]
    return (f"pruned {' and '.join(removed) or 'nothing'}: {out.num_layers} encoder and {out.decoder_layers} "
            f"decoder layers left{extra}")
