"""``comflp finetune`` / ``clip_finetune_train.py``: the flags of :class:`comflp.finetune.FinetuneConfig`.

Fine-tune ("heal") a pruned CTC, encoder-decoder or speech-LLM model (:func:`comflp.finetune.train`, whose docstring says what
one update is and what the output dir holds).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from ..errors import exit_on_error
from .. import finetune as library
from ..finetune import FinetuneConfig, train
from .argtypes import (epoch_or_last, fraction, non_negative_float, non_negative_int, probability_below_one,
                       seed)
from ..model import load_model
from ..prompt import Prompt
from ..demo.corpus import ensure_demo_corpus
from .options import (add_quiet, DEMO_DATA_HELP, ArgumentParser, add_prompt, add_repair, corpus_split, add_dataset_arguments, add_pad_audio, add_threads, command_line, positive_float,
                      positive_int, str2bool)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python clip_finetune_train.py", description=library.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Multi-GPU / multi-node: accelerate launch --multi_gpu --num_processes N "
                                       "[--num_machines M --machine_rank R --main_process_ip HOST] clip_finetune_train.py ...")
    p.add_argument("--model", help="the unpruned source (and teacher) model (default: demo)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--strategy", type=Path, help="strategy JSON from the search")
    which.add_argument("--layers", help="1-based layers to prune, e.g. 1,3,5 (instead of --strategy)")
    which.add_argument("--whole_model", action="store_true",
                       help="prune nothing and train the whole model (the demo Whisper's recipe trains one from its "
                            "random start this way, without --distill)")
    p.add_argument("--rank", type=positive_int, help="candidate of the strategy file, 1 = best (default: %(default)s)")
    p.add_argument("--decoder_layers",
                   help="encoder-decoder models (Whisper): 1-based decoder layers to prune as well (a strategy "
                        "searched on the decoder names them itself); healing is then cross-entropy on the "
                        "transcripts plus distillation of the token distributions")
    p.add_argument("--num_layers", type=positive_int, help="expected layers of --model (checked)")
    p.add_argument("--num_clip_layers", type=positive_int, help="expected number of pruned layers (checked)")
    p.add_argument("--output_dir", type=Path, help="experiment dir (default: exp/clip{L}to{L-K}_ft)")
    p.add_argument("--resume_epoch", type=epoch_or_last,
                   help="-1: resume from <output_dir>/last if present; 0: start afresh; N: restart after epoch N "
                        "from <output_dir>/epoch<N>. Only the same experiment (model, layers, data, "
                        "hyper-parameters, recorded in run.json) is resumed (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an existing experiment dir written by comflp, removing its checkpoints")
    train_dir = p.add_argument("--train_data_dir", type=Path,
                               help=f"labelled Kaldi dir to train on (default: {DEMO_DATA_HELP.format(split='train')})")
    valid_dir = p.add_argument("--valid_data_dir", type=Path,
                               help="labelled Kaldi dir to validate on after each epoch (default: the dev split of "
                                    "that embedded corpus)")
    p.add_argument("--max_train_utts", type=positive_int,
                   help="use only the first N training utterances (default: all)")
    p.add_argument("--batch_size", type=positive_int,
                   help="utterances per micro-batch, all processes together; memory grows with it (activations and "
                        "their gradients for the batch's longest utterance) (default: %(default)s)")
    p.add_argument("--max_batch_seconds", type=positive_float,
                   help="micro-batches of as many length-sorted utterances as fit in this many seconds of padded "
                        "audio, instead of --batch_size utterances (the demo models' recipe: 16)")
    p.add_argument("--grad_accum", type=positive_int, help="micro-batches per update (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: %(default)s)")
    p.add_argument("--layerdrop", type=probability_below_one, help="LayerDrop probability while training, in [0, 1) (default: %(default)s)")
    p.add_argument("--max_grad_norm", type=positive_float, help="clip the gradient's global norm to this, > 0 (default: %(default)s)")
    p.add_argument("--schedule", choices=["linear", "cosine"],
                   help="decay after the warm-up, reaching 0 one update after the last, so every update trains "
                        "(default: %(default)s)")
    p.add_argument("--warmup_updates", type=non_negative_int,
                   help="linear warm-up updates W, >= 0: update n <= W trains at n/W of --lr, so the first update "
                        "already moves the weights (default: 10%% of the updates, at least 1)")
    p.add_argument("--adam_beta2", type=probability_below_one, help="AdamW's second beta, in [0, 1) (default: %(default)s)")
    p.add_argument("--weight_decay", type=non_negative_float, help="AdamW's weight decay, >= 0 (default: %(default)s)")
    p.add_argument("--use_scheduler", type=str2bool,
                   help="warm-up (--warmup_updates) then decay (--schedule); false: --lr throughout (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, help="(default: %(default)s)")
    p.add_argument("--max_updates", type=positive_int, help="stop after this many updates in total")
    p.add_argument("--test_num_batch", type=positive_int, help="validation batches per epoch (default: %(default)s)")
    p.add_argument("--valid_batch_size", type=positive_int,
                   help="validation decoding batch size; the validation subset is the first "
                        "test_num_batch x valid_batch_size utterances (default: %(default)s)")
    p.add_argument("--freeze_feature_encoder", action="store_true", help="do not train the front end (conv feature encoder, feature projection or subsampling)")
    p.add_argument("--lora_rank", type=non_negative_int,
                   help="train LoRA adapters of this rank on every linear layer inside the layer stacks instead of "
                        "the whole model (peft; for an LLM decoder too big to fine-tune whole), the rest frozen; every "
                        "checkpoint is saved merged, a plain model; 0: fine-tune the whole model (default: %(default)s)")
    p.add_argument("--lora_alpha", type=positive_float,
                   help="the adapters' scale is lora_alpha / lora_rank, > 0 (default: 2 x --lora_rank)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="GPU only (default: %(default)s)")
    p.add_argument("--distill", action="store_true", help="add KL distillation from the unpruned teacher")
    p.add_argument("--distill_weight", type=fraction, help="w in (1-w) CTC + w KL (cross-entropy instead of CTC for encoder-decoder models; default: %(default)s)")
    p.add_argument("--temperature", type=positive_float,
                   help="distillation temperature, > 0 (default: %(default)s)")
    p.add_argument("--keep_best", action="store_true",
                   help="also keep the checkpoint of the best validation CER in <output_dir>/best (the demo "
                        "models ship it)")
    p.add_argument("--checkpoint_every", type=positive_int,
                   help="updates between resumable checkpoints (default: %(default)s)")
    add_pad_audio(p)
    p.add_argument("--seed", type=seed, help="batch order, dropout and LayerDrop, in [0, 2**32 - 1] (default: %(default)s)")
    add_threads(p)
    add_prompt(p)
    add_dataset_arguments(p, split="train", replaces=[train_dir, valid_dir])
    p.add_argument("--valid_dataset_split",
                   help="the split of --dataset that replaces --valid_data_dir (default: %(default)s)")
    add_quiet(p, "no progress bar")
    add_repair(p, healing=True)
    p.set_defaults(**asdict(FinetuneConfig()))  # one source of defaults for the command and the stage
    p.set_defaults(train_data_dir=None, valid_data_dir=None)  # chosen by the model's language (main)
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset or (args.train_data_dir is not None and args.valid_data_dir is not None):
        loaded = None
    else:  # the default corpus is the one in the language the model writes
        loaded = load_model(args.model, allow_encoder_decoder=True, need_features=False)
    prompt = Prompt(args.language, args.task, args.instruction)
    args.train_data_dir = corpus_split(args.train_data_dir, "train", loaded, prompt)
    args.valid_data_dir = corpus_split(args.valid_data_dir, "dev", loaded, prompt)
    config = FinetuneConfig(**{**vars(args), "command": command_line(parser, argv)})
    if not config.dataset:
        for data_dir in (config.train_data_dir, config.valid_data_dir):
            ensure_demo_corpus(data_dir)
    out = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fine-tuned model: {out / 'final'}")
