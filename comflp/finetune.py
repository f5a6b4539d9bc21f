"""Fine-tune ("heal") a pruned CTC model: ``clip_finetune_train.py`` / ``comflp finetune``.

The starting point is the source model pruned by a strategy file
(``--strategy FILE --rank N``) or ``--layers``; with ``--distill`` the unpruned
source is the teacher: the loss becomes ``(1 - w) * CTC + w * T^2 * KL(teacher_T || student_T)``
on the frame posteriors at temperature T, averaged over real frames.

One optimizer update = ``grad_accum`` micro-batches of ``batch_size`` utterances
(the global batch); with several processes (``accelerate launch --multi_gpu
--num_processes N``, DDP) each micro-batch is split across the processes, so
the update is the same as in one process. Micro-batches are length-sorted and
their order is shuffled per epoch from the seed; dropout and LayerDrop are
re-seeded from (seed, update) before every update, so a resumed run repeats
exactly what an uninterrupted run does.

Outputs under ``--output_dir``: ``train.log`` (the paper's ``----EPOCH: N, Test
wer : X%`` line), ``metrics.jsonl``, ``epoch<N>/`` (HF format, safetensors,
processor files) per epoch, and ``last/`` (model, optimizer, scheduler, RNG
states and position) every ``--checkpoint_every`` updates and at each epoch
end, written atomically; a run restarts from ``last/`` (``--resume_epoch -1``,
the default) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import atomic
from .data import collate, frame_mask, length_sorted_batches, read_corpus_dir
from .decode import transcribe
from .errors import ComflpError, exit_on_error
from .logs import setup_logging
from .model import LoadedModel, encoder_layers, load_model, prune, save_model
from .paths import DEMO_MODEL_DIR, EXP_DIR, demo_split
from .strategy import resolve_pruned
from .verify import verify_subset

log = logging.getLogger("comflp.finetune")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
                      temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over real frames.

    student_logits, teacher_logits: [B, T, V]; mask: [B, T] bool (real frames).
    Zero when the student equals the teacher.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [B, T]
    m = mask.to(kl.dtype)
    return t * t * (kl * m).sum() / m.sum().clamp(min=1.0)


def _labels(tokenizer, texts: list[str], device) -> torch.Tensor:
    ids = [tokenizer("".join(t.split())).input_ids for t in texts]
    out = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
    for i, seq in enumerate(ids):
        out[i, : len(seq)] = torch.tensor(seq)
    return out.to(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python clip_finetune_train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Multi-GPU / multi-node: accelerate launch --multi_gpu --num_processes N "
                                       "[--num_machines M --machine_rank R --main_process_ip HOST] clip_finetune_train.py ...")
    p.add_argument("--model", default=str(DEMO_MODEL_DIR), help="the unpruned source (and teacher) model (default: demo)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--strategy", type=Path, help="strategy JSON from the search")
    which.add_argument("--layers", help="1-based layers to prune, e.g. 1,3,5 (instead of --strategy)")
    p.add_argument("--rank", type=int, default=1, help="candidate of the strategy file, 1 = best (default: %(default)s)")
    p.add_argument("--num_layers", type=int, default=None, help="expected layers of --model (checked)")
    p.add_argument("--num_clip_layers", type=int, default=None, help="expected number of pruned layers (checked)")
    p.add_argument("--output_dir", type=Path, default=None, help="experiment dir (default: exp/clip{L}to{L-K}_ft)")
    p.add_argument("--resume_epoch", type=int, default=-1,
                   help="-1: resume from <output_dir>/last if present; 0: start afresh; N: restart after epoch N "
                        "from <output_dir>/epoch<N> (default: %(default)s)")
    p.add_argument("--train_data_dir", type=Path, default=demo_split("train"), help="(default: demo train)")
    p.add_argument("--valid_data_dir", type=Path, default=demo_split("dev"), help="(default: demo dev)")
    p.add_argument("--max_train_utts", type=int, default=None, help="use only the first N training utterances")
    p.add_argument("--batch_size", type=int, default=4, help="utterances per micro-batch, all processes together (default: %(default)s)")
    p.add_argument("--grad_accum", type=int, default=8, help="micro-batches per update (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default: %(default)s)")
    p.add_argument("--layerdrop", type=float, default=0.1, help="LayerDrop probability while training (default: %(default)s)")
    p.add_argument("--max_grad_norm", type=float, default=5.0, help="gradient clipping (default: %(default)s)")
    p.add_argument("--use_scheduler", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="linear warm-up (10%% of updates) then linear decay (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--max_updates", type=int, default=None, help="stop after this many updates in total")
    p.add_argument("--test_num_batch", type=int, default=10, help="validation batches per epoch (default: %(default)s)")
    p.add_argument("--valid_batch_size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--freeze_feature_encoder", action="store_true", help="do not train the conv feature encoder")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="GPU only (default: %(default)s)")
    p.add_argument("--distill", action="store_true", help="add KL distillation from the unpruned teacher")
    p.add_argument("--distill_weight", type=float, default=0.5, help="w in (1-w) CTC + w KL (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default: %(default)s)")
    p.add_argument("--checkpoint_every", type=int, default=50, help="updates between resumable checkpoints (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _student_and_teacher(args, device) -> tuple[LoadedModel, torch.nn.Module, list[int]]:
    source = load_model(args.model, need_tokenizer=True)
    total = len(encoder_layers(source.model))
    if args.num_layers is not None and args.num_layers != total:
        raise ComflpError(f"--num_layers {args.num_layers} but {args.model} has {total} layers")
    pruned = resolve_pruned(total, strategy=args.strategy, rank=args.rank, layers=args.layers, model_name=args.model)
    if args.num_clip_layers is not None and args.num_clip_layers != len(pruned):
        raise ComflpError(f"--num_clip_layers {args.num_clip_layers} but the strategy prunes {len(pruned)} layers")
    student = prune(source.model, pruned)
    student.config.layerdrop = args.layerdrop
    # a per-utterance mean makes the DDP average over processes equal the one-process loss
    student.config.ctc_loss_reduction = "mean"
    student.config.ctc_zero_infinity = True
    teacher = source.model.to(device).eval() if args.distill else None
    if teacher is not None:
        teacher.requires_grad_(False)
    return LoadedModel(student, source.feature_extractor, source.tokenizer, args.model), teacher, pruned


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def _save_last(out: Path, model, optimizer, scheduler, position: dict) -> None:
    with atomic.atomic_dir(out / "last") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": _rng_state()}, tmp / "trainer_state.pt")
        (tmp / "position.json").write_text(json.dumps(position))


def train(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if args.threads:
        torch.set_num_threads(args.threads)
    use_cpu = not torch.cuda.is_available()
    # LayerDrop and a frozen encoder leave parameters without gradients in some updates
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else args.mixed_precision,
                              kwargs_handlers=[ddp])
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % world:
        raise ComflpError(f"--batch_size {args.batch_size} must be divisible by the {world} processes")
    loaded, teacher, pruned = _student_and_teacher(args, accelerator.device)
    total = len(pruned) + len(encoder_layers(loaded.model))
    out = args.output_dir or EXP_DIR / f"clip{total}to{total - len(pruned)}_ft"
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "train.log" if accelerator.is_main_process else None)
    accelerator.wait_for_everyone()

    train_utts = read_corpus_dir(args.train_data_dir)
    if args.max_train_utts:
        train_utts = train_utts[: args.max_train_utts]
    valid_utts = verify_subset(read_corpus_dir(args.valid_data_dir), args.test_num_batch, args.valid_batch_size)
    micro = length_sorted_batches(train_utts, batch_size=args.batch_size)
    updates_per_epoch = math.ceil(len(micro) / args.grad_accum)
    total_updates = updates_per_epoch * args.epochs
    if args.max_updates:
        total_updates = min(total_updates, args.max_updates)

    model = loaded.model
    if args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = None
    if args.use_scheduler:
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(optimizer, max(1, total_updates // 10), total_updates)

    position = {"epoch": 0, "micro": 0, "update": 0}
    last = atomic.recover_dir(out / "last")
    if args.resume_epoch == -1 and (last / "position.json").exists():
        model.load_state_dict(load_file(str(last / "model.safetensors")))
        state = torch.load(last / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        position = json.loads((last / "position.json").read_text())
        log.info("resumed from %s at epoch %d, update %d", last, position["epoch"] + 1, position["update"])
    elif args.resume_epoch > 0:
        ckpt = out / f"epoch{args.resume_epoch}"
        if not (ckpt / "model.safetensors").exists():
            raise ComflpError(f"--resume_epoch {args.resume_epoch}: checkpoint not found: {ckpt}")
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        position = {"epoch": args.resume_epoch, "micro": 0, "update": args.resume_epoch * updates_per_epoch}
        for _ in range(position["update"]):
            if scheduler is not None:
                scheduler.step()
        log.info("restarting after epoch %d from %s (optimizer state not kept)", args.resume_epoch, ckpt)

    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    device = accelerator.device
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(total=total_updates, initial=position["update"], desc="fine-tuning", unit="update",
               disable=args.quiet or not accelerator.is_main_process)
    t0 = time.time()
    while position["epoch"] < args.epochs and position["update"] < total_updates:
        epoch = position["epoch"]
        order = np.random.default_rng([args.seed, epoch]).permutation(len(micro))
        losses = []
        while position["micro"] < len(micro) and position["update"] < total_updates:
            group = order[position["micro"]: position["micro"] + args.grad_accum]
            torch.manual_seed(args.seed * 1_000_003 + position["update"])
            optimizer.zero_grad(set_to_none=True)
            for i, index in enumerate(group):
                utts = micro[index][rank::world]
                batch = collate(utts, loaded.feature_extractor).to(device)
                labels = _labels(loaded.tokenizer, [u.text for u in utts], device)
                sync = i == len(group) - 1
                ctx = accelerator.no_sync(model) if not sync and world > 1 else _nullcontext()
                with ctx, accelerator.autocast():
                    output = model(batch.input_values, attention_mask=batch.attention_mask, labels=labels)
                    loss = output.loss
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(batch.input_values, attention_mask=batch.attention_mask).logits
                        mask = frame_mask(raw, batch.attention_mask, output.logits.shape[1])
                        kd = distillation_loss(output.logits, t_logits, mask, temperature=args.temperature)
                        loss = (1 - args.distill_weight) * loss + args.distill_weight * kd
                    accelerator.backward(loss / len(group))
                losses.append(float(loss.detach()))
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            position["micro"] += len(group)
            position["update"] += 1
            bar.update(1)
            if position["update"] % args.checkpoint_every == 0 and accelerator.is_main_process:
                _save_last(out, raw, optimizer, scheduler, position)
        if position["micro"] >= len(micro):
            _end_epoch(args, accelerator, raw, loaded, valid_utts, out, metrics_file, epoch, losses, position,
                       scheduler, t0)
            position = {"epoch": epoch + 1, "micro": 0, "update": position["update"]}
            if accelerator.is_main_process:
                _save_last(out, raw, optimizer, scheduler, position)
    bar.close()
    if accelerator.is_main_process:
        final = out / "final"
        save_model(raw, final, feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer)
        _save_last(out, raw, optimizer, scheduler, position)
    accelerator.wait_for_everyone()
    return out


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _end_epoch(args, accelerator, raw, loaded, valid_utts, out, metrics_file, epoch, losses, position, scheduler, t0):
    if not accelerator.is_main_process:
        return
    raw.eval()
    cer = transcribe(raw, loaded.feature_extractor, loaded.tokenizer, valid_utts, batch_size=args.valid_batch_size,
                     device=accelerator.device).score().rate
    raw.train()
    save_model(raw, out / f"epoch{epoch + 1}", feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer)
    row = {"epoch": epoch + 1, "update": position["update"], "train_loss": float(np.mean(losses)) if losses else None,
           "valid_cer": cer, "lr": scheduler.get_last_lr()[0] if scheduler is not None else args.lr,
           "seconds": round(time.time() - t0, 1)}
    rows = [line for line in (metrics_file.read_text().splitlines() if metrics_file.exists() else [])
            if line and json.loads(line)["epoch"] != epoch + 1]  # a resumed epoch replaces its row
    atomic.write_text(metrics_file, "".join(r + "\n" for r in rows + [json.dumps(row)]))
    log.info("----EPOCH: %d, Test wer : %s%%", epoch + 1, 100 * cer)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fine-tuned model: {out / 'final'}")


if __name__ == "__main__":
    main()
