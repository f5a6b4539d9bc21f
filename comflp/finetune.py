"""Fine-tune ("heal") a pruned CTC, encoder-decoder or speech-LLM model: ``clip_finetune_train.py`` /
``comflp finetune``.

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

import contextlib
import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import atomic
from .artifacts import ExperimentDir, finetune_output, output_lock, source_id
from .data import collate, length_sorted_batches
from .hfdata import DatasetSource, read_corpus_or_dataset
from .decode import transcribe
from .errors import ComflpError
from .heads import check_prompt, head_of, require
from .prompt import Prompt, detect_languages, needs_detection
from .logs import logging_to
from .lora import has_lora, merged, with_lora
from .model import (LoadedModel, family_of, freeze_feature_encoder, load_model, num_layers, prune, save_model,
                    set_layerdrop)
from .paths import DEMO_MODEL_DIR, demo_split, exp_dir
from .repair import fold_into_pruned
from .strategy import (DEFAULT_CALIB_UTTS, DEFAULT_REPAIR_RIDGE, StrategyFile, check_num_layers, parse_layers,
                       resolve_pruned, validate)
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


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run: the flags of ``comflp finetune`` (same names, same defaults; the
    parser takes its defaults from here). What each means: ``comflp finetune --help``."""

    model: str = str(DEMO_MODEL_DIR)
    strategy: Path | None = None
    layers: str | None = None
    whole_model: bool = False
    rank: int = 1
    decoder_layers: str | None = None
    num_layers: int | None = None
    num_clip_layers: int | None = None
    output_dir: Path | None = None
    resume_epoch: int = -1
    overwrite: bool = False
    train_data_dir: Path = field(default_factory=lambda: demo_split("train"))
    valid_data_dir: Path = field(default_factory=lambda: demo_split("dev"))
    max_train_utts: int | None = None
    batch_size: int = 4
    max_batch_seconds: float | None = None
    grad_accum: int = 8
    lr: float = 2e-5
    schedule: str = "linear"
    warmup_updates: int | None = None
    adam_beta2: float = 0.999
    weight_decay: float = 0.01
    layerdrop: float = 0.1
    max_grad_norm: float = 5.0
    use_scheduler: bool = True
    epochs: int = 50
    max_updates: int | None = None
    test_num_batch: int = 10
    valid_batch_size: int = 32
    freeze_feature_encoder: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    mixed_precision: str = "no"
    distill: bool = False
    distill_weight: float = 0.5
    temperature: float = 2.0
    checkpoint_every: int = 50
    keep_best: bool = False
    pad_audio: bool = False
    seed: int = 0
    threads: int | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    audio_column: str = "audio"
    text_column: str | None = None
    valid_dataset_split: str = "validation"
    quiet: bool = False
    language: str | None = None
    task: str | None = None
    instruction: str | None = None
    repair: str = "none"
    calib_data_dir: Path | None = None
    calib_utts: int = DEFAULT_CALIB_UTTS
    calib_batch_size: int = 8
    calib_seed: int = 0
    repair_ridge: float = DEFAULT_REPAIR_RIDGE
    command: str | None = None  # the command line, for the model card (not a setting of the run: not in run.json)

    def validate(self) -> None:
        """Every numeric setting in its range, one line naming the flag otherwise (the API takes what the
        command line's types check; torch's own errors name no flag, and some values train silently wrong:
        ``max_grad_norm`` 0 leaves the weights as they were)."""
        for name, ok, what in _RANGES:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ComflpError(f"--{name} must be {what}, got {value}")


_RANGES = (
    ("rank", lambda v: v >= 1, "a positive integer"),
    ("num_layers", lambda v: v >= 1, "a positive integer"),
    ("num_clip_layers", lambda v: v >= 1, "a positive integer"),
    ("resume_epoch", lambda v: v >= -1, "-1 (resume from last/), 0 (afresh) or an epoch"),
    ("max_train_utts", lambda v: v >= 1, "a positive integer"),
    ("batch_size", lambda v: v >= 1, "a positive integer"),
    ("max_batch_seconds", lambda v: 0 < v < math.inf, "a positive number"),
    ("grad_accum", lambda v: v >= 1, "a positive integer"),
    ("lr", lambda v: 0 < v < math.inf, "a positive number"),
    ("warmup_updates", lambda v: v >= 0, "an integer >= 0"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0"),
    ("layerdrop", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_grad_norm", lambda v: 0 < v < math.inf, "a positive number (0 would leave the weights unchanged)"),
    ("epochs", lambda v: v >= 1, "a positive integer"),
    ("max_updates", lambda v: v >= 1, "a positive integer"),
    ("test_num_batch", lambda v: v >= 1, "a positive integer"),
    ("valid_batch_size", lambda v: v >= 1, "a positive integer"),
    ("distill_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("temperature", lambda v: 0 < v < math.inf, "a positive number"),
    ("checkpoint_every", lambda v: v >= 1, "a positive integer"),
    ("seed", lambda v: 0 <= v <= 2**32 - 1, "in [0, 4294967295]"),
    ("threads", lambda v: v >= 1, "a positive integer"),
    ("calib_utts", lambda v: v >= 1, "a positive integer"),
    ("calib_batch_size", lambda v: v >= 1, "a positive integer"),
    ("calib_seed", lambda v: 0 <= v <= 2**32 - 1, "in [0, 4294967295]"),
    ("repair_ridge", lambda v: 0 <= v < math.inf, "a number >= 0"),
    ("lora_rank", lambda v: v >= 0, "an integer >= 0"),
    ("lora_alpha", lambda v: 0 < v < math.inf, "a positive number"),
)


def lr_factor(update: int, *, warmup: int, total: int, schedule: str) -> float:
    """The share of the peak learning rate that update ``update`` (1-based, of ``total``) trains with.

    Warm-up: update n <= W trains at n / W, so the first update moves the weights and update W is at the
    peak. Then a linear or cosine decay that would reach 0 one update after the last, so the last update
    trains too. (transformers' schedules give the first update a learning rate of 0 and the last one 0 as
    well: a ``--max_updates 1`` run changed nothing.)
    """
    if update <= warmup:
        return update / warmup
    progress = (update - warmup) / (total + 1 - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _student_and_teacher(args, device) -> tuple[LoadedModel, torch.nn.Module, list[int], list[int], dict]:
    """The pruned student, the source as teacher (or None), the layers pruned from each stack, and the model
    card record of the student before healing (:func:`comflp.modelcard.pruning_record`)."""
    from .modelcard import pruning_record, strategy_source

    source = load_model(args.model, need_tokenizer=True, need_ctc_head=True, allow_encoder_decoder=True)
    require(source.model, "train", "fine-tuning")
    stack = StrategyFile.load(args.strategy).stack if args.strategy is not None else "encoder"
    if stack == "decoder" and args.decoder_layers is not None:
        raise ComflpError(f"{args.strategy} prunes the decoder: drop --decoder_layers")
    total = num_layers(source.model, stack)
    check_num_layers(args.num_layers, total, args.model)
    decoder = (validate(parse_layers(args.decoder_layers), num_layers(source.model, "decoder"))
               if args.decoder_layers is not None else [])
    pruned = ([] if args.whole_model or (args.strategy is None and args.layers is None and decoder) else
              resolve_pruned(total, strategy=args.strategy, rank=args.rank, layers=args.layers, model_name=args.model))
    if args.num_clip_layers is not None and args.num_clip_layers != len(pruned):
        raise ComflpError(f"--num_clip_layers {args.num_clip_layers} but the strategy prunes {len(pruned)} layers")
    if stack == "decoder":
        pruned, decoder = [], pruned
    fitted = None
    if pruned or decoder:
        student = prune(source.model, pruned, decoder_pruned=decoder)
        if args.repair != "none":  # healing starts from the repaired model
            fitted = _fit_repair(args, source, pruned, decoder)
            fold_into_pruned(student, source.model, fitted, {"encoder": pruned, "decoder": decoder})
    else:  # --whole_model
        student = copy.deepcopy(source.model)
    if not set_layerdrop(student, args.layerdrop) and args.layerdrop > 0:
        log.warning("%s has no LayerDrop: training without it (--layerdrop %s not applied)",
                    student.config.model_type, args.layerdrop)
    head_of(student).prepare_training(student)
    teacher = source.model.to(device).eval() if args.distill else None
    if teacher is not None:
        teacher.requires_grad_(False)
    strategy = (strategy_source(StrategyFile.load(args.strategy), args.strategy, args.rank)
                if args.strategy is not None else None)
    card = pruning_record(args.model, source.model, student, {"encoder": pruned, "decoder": decoder},
                          strategy=strategy, command=args.command,
                          repair=fitted.record() if fitted else None)
    return (LoadedModel(student, source.feature_extractor, source.tokenizer, args.model), teacher, pruned, decoder,
            card)


def _fit_repair(args: FinetuneConfig, source: LoadedModel, pruned: list[int], decoder: list[int]):
    """The repair (``--repair``) of the layers pruned from ``source``, fitted on the calibration utterances:
    ``--calib_data_dir``, else the training corpus."""
    from .data import read_corpus_dir
    from .repair import calibration_subset, fit_repair

    if args.calib_data_dir is None and args.dataset:
        raise ComflpError("--repair with --dataset: give the calibration utterances as --calib_data_dir")
    data_dir = Path(args.calib_data_dir or args.train_data_dir)
    chosen = calibration_subset(read_corpus_dir(data_dir, require_text=bool(decoder)), args.calib_utts,
                                args.calib_seed)
    fitted = fit_repair(source, chosen, layers=pruned, decoder_layers=decoder, kind=args.repair,
                        ridge=args.repair_ridge, batch_size=args.calib_batch_size,
                        data=f"{data_dir} ({len(chosen)} utterances, seed {args.calib_seed})",
                        prompt=Prompt(args.language, args.task, args.instruction), pad_audio=args.pad_audio, progress=not args.quiet)
    for m in fitted.maps:
        log.info("repaired %s block %s before healing: R² %.4f (unrepaired %.4f)", m.cut.stack, list(m.cut.block),
                 m.r2, m.r2_unrepaired)
    return fitted


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def _shared_names(model) -> set[str]:
    """State-dict names whose tensor shares storage with another (tied weights: Whisper's output projection)."""
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    return {name for names in by_storage.values() if len(names) > 1 for name in names}


def _save_weights(model, path: Path) -> None:
    """model.safetensors of ``model``, tied weights stored once (safetensors refuses shared tensors).

    Written out rather than safetensors' ``save_model`` so that tensors on any device are moved to the CPU
    and made contiguous first, as before tied weights needed care.
    """
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor.detach().contiguous().cpu()
    save_file(state, str(path))


def _load_weights(model, path: Path) -> None:
    """Load a model.safetensors written by :func:`_save_weights` or ``save_pretrained`` (tied weights once).

    Not safetensors' ``load_model``: ``save_pretrained`` may keep the other name of a tied pair than safetensors
    would, which its strict check calls missing; any name of a shared group may be the one stored.
    """
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = set(missing) - _shared_names(model)
    if missing or unexpected:
        raise ComflpError(f"{path} does not hold this model's weights (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")


def _save_last(target: Path, model, optimizer, scheduler, position: dict) -> None:
    with atomic.atomic_dir(target) as tmp:
        _save_weights(model, ExperimentDir.weights(tmp))
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": _rng_state()}, ExperimentDir.trainer_state(tmp))
        ExperimentDir.position(tmp).write_text(json.dumps(position))


def train(args: FinetuneConfig) -> Path:
    """Run (or resume) the fine-tuning run ``args`` describes; returns its experiment dir."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    args.validate()
    if args.lora_alpha is not None and not args.lora_rank:
        raise ComflpError("--lora_alpha scales LoRA adapters: give --lora_rank too")
    if args.lora_rank and args.resume_epoch > 0:
        raise ComflpError("--resume_epoch N restarts from a saved epoch, which is merged (no adapters left): start a "
                          "new run with that epoch's dir as --model instead")
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cpu = not torch.cuda.is_available()
    # LayerDrop and a frozen encoder leave parameters without gradients in some updates
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else args.mixed_precision,
                              kwargs_handlers=[ddp])
    world = accelerator.num_processes
    if args.max_batch_seconds is None and args.batch_size % world:
        raise ComflpError(f"--batch_size {args.batch_size} must be divisible by the {world} processes")
    loaded, teacher, pruned, decoder_pruned, card = _student_and_teacher(args, accelerator.device)
    check_prompt(loaded.model, Prompt(args.language, args.task, args.instruction))  # one line before anything is written
    if not family_of(loaded.model).layerdrop:
        args = replace(args, layerdrop=0.0)  # what the run does, and so what run.json records
    total = len(pruned) + num_layers(loaded.model)
    out = Path(args.output_dir or finetune_output(exp_dir(), total, len(pruned)))
    afresh = args.overwrite or args.resume_epoch == 0
    lock = output_lock(out) if accelerator.is_main_process else contextlib.nullcontext()
    try:
        with lock:
            if accelerator.is_main_process:
                ExperimentDir.open(out, settings=run_settings(args, pruned, decoder_pruned), kind="finetune",
                                   afresh=afresh)
            accelerator.wait_for_everyone()
            exp = ExperimentDir(out)
            with logging_to(exp.command_log("train") if accelerator.is_main_process else None):
                return _train(args, accelerator, loaded, teacher, exp, card)
    finally:
        # several processes: close their group, so that its threads end before the interpreter does (left to
        # exit, a gloo group can abort the process: "terminate called without an active exception")
        accelerator.end_training()


def run_settings(args: FinetuneConfig, pruned: list[int], decoder_pruned: Sequence[int] = ()) -> dict:
    """The settings that define a fine-tuning run: a resumed run must have the same ones."""
    keys = ("max_train_utts", "batch_size", "grad_accum", "lr", "layerdrop", "max_grad_norm", "use_scheduler",
            "epochs", "max_updates", "test_num_batch", "valid_batch_size", "freeze_feature_encoder", "distill",
            "distill_weight", "temperature", "seed", "pad_audio")
    data = ({"dataset": source_id(args.dataset), "dataset_split": args.dataset_split,
             "valid_dataset_split": args.valid_dataset_split, "audio_column": args.audio_column,
             "text_column": args.text_column} if args.dataset else
            {"train_data_dir": source_id(args.train_data_dir), "valid_data_dir": source_id(args.valid_data_dir)})
    decoder = {"decoder_pruned": list(decoder_pruned)} if decoder_pruned else {}  # CTC runs keep their run.json
    # settings that did not exist when earlier runs were recorded are recorded only when not the default, so
    # those runs still resume
    newer = {k: getattr(args, k) for k in ("max_batch_seconds", "schedule", "warmup_updates", "adam_beta2",
                                            "weight_decay", "keep_best", "language", "task", "repair",
                                            "lora_rank", "lora_alpha", "instruction")
             if getattr(args, k) != getattr(FinetuneConfig, k)}
    if args.repair != "none":  # what the repaired start was fitted on
        newer.update({k: getattr(args, k) for k in ("calib_utts", "calib_seed", "repair_ridge")},
                     calib_data_dir=source_id(args.calib_data_dir or args.train_data_dir))
    return {"model": source_id(args.model), "pruned": list(pruned), **decoder, **data,
            **{k: getattr(args, k) for k in keys}, **newer}


def _train(args: FinetuneConfig, accelerator, loaded: LoadedModel, teacher, exp: ExperimentDir, card: dict) -> Path:
    world, rank = accelerator.num_processes, accelerator.process_index
    prompt = check_prompt(loaded.model, Prompt(args.language, args.task, args.instruction))
    out = exp.root
    train_utts = read_corpus_or_dataset(DatasetSource.of(args), args.train_data_dir)
    if args.max_train_utts:
        train_utts = train_utts[: args.max_train_utts]
    train_utts = head_of(loaded.model).check_training_data(train_utts, loaded.tokenizer, loaded.model,
                                                           loaded.feature_extractor)
    valid = DatasetSource.of(args, split=args.valid_dataset_split)
    valid_utts = verify_subset(read_corpus_or_dataset(valid, args.valid_data_dir), args.test_num_batch,
                               args.valid_batch_size)
    micro = (length_sorted_batches(train_utts, max_seconds=args.max_batch_seconds) if args.max_batch_seconds
             else length_sorted_batches(train_utts, batch_size=args.batch_size))
    updates_per_epoch = math.ceil(len(micro) / args.grad_accum)
    total_updates = updates_per_epoch * args.epochs
    if args.max_updates:
        total_updates = min(total_updates, args.max_updates)

    model = loaded.model
    if args.freeze_feature_encoder:
        freeze_feature_encoder(model)
    if args.lora_rank:  # before a resume loads last/, which holds the adapters
        with_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, seed=args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  betas=(0.9, args.adam_beta2), weight_decay=args.weight_decay)
    scheduler = None
    if args.use_scheduler:
        warmup = min(total_updates, args.warmup_updates if args.warmup_updates is not None
                     else max(1, total_updates // 10))
        # step s of LambdaLR is the learning rate of update s + 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step + 1, warmup=warmup, total=total_updates, schedule=args.schedule))

    position = {"epoch": 0, "micro": 0, "update": 0, "loss_sum": 0.0, "loss_count": 0}
    last = atomic.recover_dir(exp.last)
    if args.resume_epoch == -1 and ExperimentDir.position(last).exists():
        _load_weights(model, ExperimentDir.weights(last))
        state = torch.load(ExperimentDir.trainer_state(last), weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        position = json.loads(ExperimentDir.position(last).read_text())
        log.info("resumed from %s at epoch %d, update %d", last, position["epoch"] + 1, position["update"])
    elif args.resume_epoch > 0:
        ckpt = exp.epoch(args.resume_epoch)
        if not ExperimentDir.weights(ckpt).exists():
            raise ComflpError(f"--resume_epoch {args.resume_epoch}: checkpoint not found: {ckpt}")
        _load_weights(model, ExperimentDir.weights(ckpt))
        position = {"epoch": args.resume_epoch, "micro": 0, "update": args.resume_epoch * updates_per_epoch,
                    "loss_sum": 0.0, "loss_count": 0}
        for _ in range(position["update"]):
            if scheduler is not None:
                scheduler.step()
        log.info("restarting after epoch %d from %s (optimizer state not kept)", args.resume_epoch, ckpt)

    if accelerator.is_main_process and position["update"] == 0 and not any(
            r["epoch"] == 0 for r in exp.read_metrics()):
        # epoch 0: the pruned model before healing, and the unpruned source as the reference
        row = {"epoch": 0, "update": 0, "train_loss": None,
               "valid_cer": validation_cer(model, loaded, valid_utts, batch_size=args.valid_batch_size,
                                           device=accelerator.device, pad_audio=args.pad_audio, prompt=prompt),
               "lr": 0.0, "seconds": 0.0}
        if args.whole_model:  # the source is the model itself
            log.info("----EPOCH: 0, Test wer : %s%% (before training)", 100 * row["valid_cer"])
        else:
            source = teacher if teacher is not None else load_model(args.model, need_tokenizer=True,
                                                                    allow_encoder_decoder=True).model
            row["source_valid_cer"] = validation_cer(source, loaded, valid_utts, batch_size=args.valid_batch_size,
                                                     device=accelerator.device, pad_audio=args.pad_audio, prompt=prompt)
            log.info("----EPOCH: 0, Test wer : %s%% (pruned, before fine-tuning; unpruned: %s%%)",
                     100 * row["valid_cer"], 100 * row["source_valid_cer"])
        exp.write_metrics_row(row)
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    device = accelerator.device
    head = head_of(raw)  # CTC, or cross-entropy on the teacher-forced transcripts (Whisper)
    detector = detector_model(args, loaded, teacher, prompt)
    detected: dict[str, str] = {}

    def languages(utts, batch) -> list[str] | None:
        """Each utterance's prompt language as the unpruned source detects it (when the prompt needs one)."""
        if detector is None:
            return None
        todo = [i for i, u in enumerate(utts) if u.utt_id not in detected]
        if todo:
            with torch.no_grad():
                found = detect_languages(detector, batch, prompt)
            detected.update((utts[i].utt_id, found[i]) for i in todo)
        return [detected[u.utt_id] for u in utts]
    bar = tqdm(total=total_updates, initial=position["update"], desc="fine-tuning", unit="update",
               disable=args.quiet or not accelerator.is_main_process)
    t0 = time.time()
    while position["epoch"] < args.epochs and position["update"] < total_updates:
        epoch = position["epoch"]
        order = np.random.default_rng([args.seed, epoch]).permutation(len(micro))
        while position["micro"] < len(micro) and position["update"] < total_updates:
            group = order[position["micro"]: position["micro"] + args.grad_accum]
            torch.manual_seed(args.seed * 1_000_003 + position["update"])
            optimizer.zero_grad(set_to_none=True)
            for i, index in enumerate(group):
                utts = micro[index][rank::world]
                batch = collate(utts, loaded.feature_extractor).to(device)
                labels = head.labels(raw, loaded.tokenizer, [u.text for u in utts], prompt=prompt,
                                     languages=languages(utts, batch), batch=batch).to(device)
                sync = i == len(group) - 1
                ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    output = head.student_output(model, loaded.tokenizer, batch, labels, pad_audio=args.pad_audio,
                                                 prompt=prompt)
                    loss = output.loss
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = head.teacher_logits(teacher, batch, labels, pad_audio=args.pad_audio,
                                                           tokenizer=loaded.tokenizer, prompt=prompt)
                        mask = head.distillation_mask(raw, batch, labels, output.logits)
                        kd = distillation_loss(output.logits, t_logits, mask, temperature=args.temperature)
                        loss = (1 - args.distill_weight) * loss + args.distill_weight * kd
                    if not torch.isfinite(loss.detach()):
                        raise ComflpError(f"the training loss became {float(loss)} at update {position['update'] + 1}; "
                                          "nothing was saved from this update (lower --lr or check the data)")
                    accelerator.backward(loss / len(group))
                position["loss_sum"] = position.get("loss_sum", 0.0) + float(loss.detach())
                position["loss_count"] = position.get("loss_count", 0) + 1
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            position["micro"] += len(group)
            position["update"] += 1
            bar.update(1)
            if position["update"] % args.checkpoint_every == 0 and accelerator.is_main_process:
                _save_last(exp.last, raw, optimizer, scheduler, position)
        # an epoch ends with its last micro-batch, or (the budget spent: --max_updates) where training stops
        if position["micro"] >= len(micro) or position["update"] >= total_updates:
            _end_epoch(args, accelerator, raw, loaded, valid_utts, exp, position, scheduler, t0, card)
            position = {"epoch": epoch + 1, "micro": 0, "update": position["update"], "loss_sum": 0.0,
                        "loss_count": 0}
            if accelerator.is_main_process:
                _save_last(exp.last, raw, optimizer, scheduler, position)
    bar.close()
    if accelerator.is_main_process:
        save_model(merged(raw) if has_lora(raw) else raw, exp.final, feature_extractor=loaded.feature_extractor,
                   tokenizer=loaded.tokenizer, overwrite=True,
                   extra_text=_healed_card(card, args, exp, position["epoch"], exp.final))
        _save_last(exp.last, raw, optimizer, scheduler, position)
    accelerator.wait_for_everyone()
    return out


def detector_model(args: FinetuneConfig, loaded: LoadedModel, teacher, prompt: Prompt):
    """The model whose language detection gives the training labels their prompt: the unpruned source (the
    teacher when distilling), or None when the prompt needs no detection."""
    if not needs_detection(loaded.model, prompt):
        return None
    if teacher is not None:
        return teacher
    source = load_model(args.model, allow_encoder_decoder=True).model
    return source.to(next(loaded.model.parameters()).device).eval()


def validation_cer(model, loaded: LoadedModel, valid_utts, *, batch_size: int, device, pad_audio: bool,
                   prompt: Prompt | None = None) -> float:
    """CER of ``model`` on the validation subset (batch-invariant unless ``pad_audio``)."""
    was_training = model.training
    model.eval()
    cer = transcribe(model, loaded.feature_extractor, loaded.tokenizer, valid_utts, batch_size=batch_size,
                     device=device, pad_audio=pad_audio, prompt=prompt).score().rate
    model.train(was_training)
    return cer


def _healed_card(card: dict, args: FinetuneConfig, exp: ExperimentDir, epochs: int, model_dir: Path) -> dict[str, str]:
    """The card files of the model after ``epochs`` epochs of this run, saved to ``model_dir``: the pruning
    record with the healing (data, learning rate, distillation, validation CER before and after)."""
    from .modelcard import card_files, with_healing

    rows = {r["epoch"]: r for r in exp.read_metrics()}
    healing = {"epochs": epochs, "run": str(exp.root.resolve()), "lr": args.lr, "distill": args.distill,
               **({"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha or 2 * args.lora_rank}
                  if args.lora_rank else {}),
               "distill_weight": args.distill_weight, "temperature": args.temperature,
               "data": source_id(args.dataset or args.train_data_dir),
               "valid_cer": rows.get(epochs, {}).get("valid_cer"), "valid_cer_before": rows.get(0, {}).get("valid_cer")}
    return card_files(with_healing(card, healing), model_dir=model_dir)


def _end_epoch(args, accelerator, raw, loaded, valid_utts, exp: ExperimentDir, position: dict, scheduler, t0,
               card: dict) -> None:
    if not accelerator.is_main_process:
        return
    epoch = position["epoch"] + 1
    cer = validation_cer(raw, loaded, valid_utts, batch_size=args.valid_batch_size, device=accelerator.device,
                         pad_audio=args.pad_audio, prompt=check_prompt(raw, Prompt(args.language, args.task, args.instruction)))
    count = position.get("loss_count", 0)
    row = {"epoch": epoch, "update": position["update"],
           "train_loss": position["loss_sum"] / count if count else None,
           "valid_cer": cer, "lr": scheduler.get_last_lr()[0] if scheduler is not None else args.lr,
           "seconds": round(time.time() - t0, 1)}
    best_so_far = all(cer < r["valid_cer"] for r in exp.read_metrics() if r["epoch"] not in (0, epoch)
                      and isinstance(r.get("valid_cer"), (int, float)))
    exp.write_metrics_row(row)
    plain = merged(raw) if has_lora(raw) else raw  # a saved model is plain: adapters merged
    save_model(plain, exp.epoch(epoch), feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer,
               overwrite=True, extra_text=_healed_card(card, args, exp, epoch, exp.epoch(epoch)))
    log.info("----EPOCH: %d, Test wer : %s%%", epoch, 100 * cer)
    if args.keep_best and best_so_far:
        save_model(plain, exp.best, feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer,
                   overwrite=True, extra_text=_healed_card(card, args, exp, epoch, exp.best))
        log.info("best validation CER so far -> %s", exp.best)
