"""Recipes for the embedded demo models ``models/demo-12l``, ``models/demo-24l`` and ``models/demo-whisper``.

``python -m comflp.demo train [--num_layers 24]`` trains a small wav2vec2-style
CTC model (12 layers unless told) from scratch on the embedded synthetic corpus (generated if missing);
``python -m comflp.demo whisper-init`` makes the demo Whisper's random start, which ``comflp finetune
--whole_model`` trains; ``python -m comflp.demo ship`` saves a trained model as shipped (float16);
``python -m comflp.demo card`` measures a shipped model and writes its model card with the
pruning tables. All are deterministic from their seed on a given machine and
torch build.

Recipe (found to leave the blank plateau reliably on 2 CPU cores): Zipf
text, group-norm conv features, AdamW lr 5e-4 (betas 0.9/0.98, wd 0.01),
linear warm-up then cosine decay, length-sorted batches of <= 16 s of padded
audio, gradient clipping at 5.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                          WhisperConfig, WhisperFeatureExtractor, get_cosine_schedule_with_warmup)

from .. import atomic
from ..data import length_sorted_batches, load_audio
from ..options import ArgumentParser, positive_int, read_corpus
from ..decode import transcribe
from ..errors import ComflpError, exit_on_error
from ..logs import setup_logging
from ..artifacts import ExperimentDir, claim_dir
from ..model import forward, save_model
from ..paths import DEMO_CORPUS_DIR, DEMO_MODEL_DIR, DEMO_WHISPER_DIR, EXP_DIR, demo_model_dir, demo_split

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<unk>", "|")


def demo_config(vocab_size: int, *, num_layers: int = 12) -> Wav2Vec2Config:
    """The demo architecture: wav2vec2 with stable layer norm, 144-wide layers (12 layers: ~3.4M parameters)."""
    return Wav2Vec2Config(
        vocab_size=vocab_size, pad_token_id=0, num_hidden_layers=num_layers, hidden_size=144, num_attention_heads=4,
        intermediate_size=576, conv_dim=(64, 64, 128, 128, 128, 128, 128), feat_extract_norm="group",
        do_stable_layer_norm=True, num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16,
        hidden_dropout=0.05, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, ctc_loss_reduction="mean", ctc_zero_infinity=True,
    )


def build_processor(vocab: str, out_dir: Path) -> tuple[Wav2Vec2FeatureExtractor, Wav2Vec2CTCTokenizer]:
    """Character tokenizer (``<pad>`` is the CTC blank) and a 16 kHz feature extractor."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = list(SPECIAL_TOKENS) + [c for c in vocab if c not in SPECIAL_TOKENS]
    vocab_file = out_dir / "vocab.json"
    atomic.write_json(vocab_file, {t: i for i, t in enumerate(tokens)})
    tok = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|",
                               bos_token=None, eos_token=None)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    return fe, tok


WHISPER_SPECIAL_TOKENS = ("<pad>", "<|startoftranscript|>", "<|endoftext|>", "<unk>")
WHISPER_WINDOW_S = 4  # the corpus's longest utterance is 3.65 s; Whisper pads every input to its window


def whisper_config(vocab_size: int, *, encoder_layers: int = 4, decoder_layers: int = 4,
                   d_model: int = 192) -> WhisperConfig:
    """The demo Whisper: Whisper's architecture at 192 wide, a 4-s window (200 encoder frames), characters."""
    return WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=4, decoder_attention_heads=4, d_model=d_model, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, max_source_positions=WHISPER_WINDOW_S * 50, max_target_positions=64,
        pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, dropout=0.1,
        begin_suppress_tokens=None, suppress_tokens=None)


def build_whisper_processor(vocab: str) -> tuple[WhisperFeatureExtractor, object]:
    """A 4-s Whisper feature extractor and a character tokenizer with Whisper's start and end tokens around
    each transcript (spaces dropped: the corpus is Chinese characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(WHISPER_SPECIAL_TOKENS) + [c for c in vocab if c not in WHISPER_SPECIAL_TOKENS]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex("."), behavior="isolated")])
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftranscript|> $A <|endoftext|>", special_tokens=[("<|startoftranscript|>", 1),
                                                                          ("<|endoftext|>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftranscript|>",
                                  eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>")
    return WhisperFeatureExtractor(feature_size=80, chunk_length=WHISPER_WINDOW_S), tok


def whisper_init(args: argparse.Namespace) -> Path:
    """The demo Whisper's random start, saved as an HF model; ``comflp finetune --whole_model`` trains it."""
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    from ..model import save_model

    train_utts = read_corpus(demo_split("train"))
    vocab = "".join(sorted({c for u in train_utts for c in u.text if not c.isspace()}))
    fe, tok = build_whisper_processor(vocab)
    torch.manual_seed(args.seed)
    model = WhisperForConditionalGeneration(whisper_config(len(tok), encoder_layers=args.encoder_layers,
                                                           decoder_layers=args.decoder_layers, d_model=args.d_model))
    # never generate the padding or the start token, nor end before the first character (as Whisper's own)
    model.generation_config = GenerationConfig(decoder_start_token_id=1, bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0, suppress_tokens=[0, 1], begin_suppress_tokens=[2])
    out = save_model(model, args.output, feature_extractor=fe, tokenizer=tok, overwrite=args.overwrite)
    log.info("demo Whisper start: %d parameters, vocab %d -> %s", sum(p.numel() for p in model.parameters()),
             len(tok), out)
    return out


def ship(model: Path, output: Path, *, overwrite: bool = False) -> Path:
    """``model`` saved to ``output`` in float16 with its processor (what the shipped demo models are)."""
    from ..model import load_model, save_model

    loaded = load_model(model, need_tokenizer=True, allow_encoder_decoder=True)
    out = save_model(loaded.model, output, feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer,
                     dtype=torch.float16, overwrite=overwrite)
    log.info("shipped %s as float16 -> %s", model, out)
    return out


def _save_state(path: Path, model, optimizer, scheduler, step: int, best: float) -> None:
    # one atomic dir: a run killed while saving resumes from a consistent step (weights, optimizer, step)
    with atomic.atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "best_dev_cer": best}))


def train(args: argparse.Namespace) -> None:
    exp = Path(args.exp_dir)
    claim_dir(args.output, overwrite=args.overwrite)  # refuse now, not after hours of training
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k in ("num_layers", "train_data_dir", "dev_data_dir", "steps", "lr", "warmup", "max_seconds", "seed",
                         "pad_audio")}
    # --resume continues only the same recipe; without it the run starts over
    ExperimentDir.open(exp, settings=settings, kind="demo-train", afresh=not args.resume, flag="--exp_dir",
                       restart_flags="no --resume")
    setup_logging(exp / "train.log")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_utts = read_corpus(demo_split("train") if args.train_data_dir is None else args.train_data_dir)
    dev_utts = read_corpus(demo_split("dev") if args.dev_data_dir is None else args.dev_data_dir)
    vocab = "".join(sorted({c for u in train_utts for c in u.text if not c.isspace()}))
    fe, tok = build_processor(vocab, exp / "processor")
    model = Wav2Vec2ForCTC(demo_config(len(tok), num_layers=args.num_layers))
    log.info("model: %d parameters, vocab %d", sum(p.numel() for p in model.parameters()), len(tok))

    waves = {u.utt_id: load_audio(u.path, 16000, utt_id=u.utt_id) for u in tqdm(train_utts, desc="loading audio")}
    labels = {u.utt_id: tok(u.text.replace(" ", "")).input_ids for u in train_utts}
    batches = length_sorted_batches(train_utts, max_seconds=args.max_seconds)
    log.info("%d train utterances in %d batches of <= %.0f s", len(train_utts), len(batches), args.max_seconds)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    step, best = 0, math.inf
    state_dir = atomic.recover_dir(exp / "last")
    if args.resume and (state_dir / "state.json").exists():
        model.load_state_dict(load_file(str(state_dir / "model.safetensors")))
        opt = torch.load(state_dir / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        st = json.loads((state_dir / "state.json").read_text())
        step, best = st["step"], st["best_dev_cer"]
        log.info("resumed at step %d", step)

    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step")
    model.train()
    done_rows = ExperimentDir(exp).read_metrics(key="step") if step else []
    t0 = time.time() - (done_rows[-1]["elapsed_s"] if done_rows else 0.0)  # a resumed run keeps counting
    running = []
    while step < args.steps:
        epoch, pos = divmod(step, len(batches))
        order = np.random.default_rng([args.seed, epoch]).permutation(len(batches))
        group = batches[order[pos]]
        feats = fe([waves[u.utt_id] for u in group], sampling_rate=16000, padding=True,
                   return_attention_mask=True, return_tensors="pt")
        lab = [labels[u.utt_id] for u in group]
        target = torch.full((len(lab), max(map(len, lab))), -100, dtype=torch.long)
        for i, ids in enumerate(lab):
            target[i, : len(ids)] = torch.tensor(ids)
        torch.manual_seed(args.seed * 1_000_003 + step)  # dropout depends on the step only: resumable
        loss = forward(model, feats["input_values"], feats["attention_mask"], labels=target,
                       pad_audio=args.pad_audio).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        running.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            dev = transcribe(model, fe, tok, dev_utts, batch_size=32).score("char")
            model.train()
            row = {"step": step, "epoch": epoch, "train_loss": float(np.mean(running)), "dev_cer": dev.rate,
                   "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1)}
            running = []
            ExperimentDir(exp).write_metrics_row(row, key="step")  # a resumed run replaces, never repeats, rows
            log.info("step %d  loss %.3f  dev CER %.2f%%", step, row["train_loss"], 100 * dev.rate)
            if dev.rate < best:
                best = dev.rate
                save_model(model, exp / "best", feature_extractor=fe, tokenizer=tok, overwrite=True)
            _save_state(state_dir, model, optimizer, scheduler, step, best)
    bar.close()
    best_dir = exp / "best"
    from ..model import load_model

    final = load_model(best_dir)
    save_model(final.model, args.output, feature_extractor=final.feature_extractor, tokenizer=final.tokenizer,
               overwrite=args.overwrite,
               dtype=torch.float16)
    log.info("best dev CER %.2f%%; shipped fp16 model to %s", 100 * best, args.output)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m comflp.demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the demo model from scratch on the embedded corpus")
    t.add_argument("--num_layers", type=positive_int, default=12,
                   help="transformer layers; the defaults of --output and --exp_dir follow it (default: %(default)s)")
    t.add_argument("--output", type=Path, default=None,
                   help="where the shipped fp16 model goes (default: models/demo-<num_layers>l)")
    t.add_argument("--exp_dir", type=Path, default=None,
                   help="log, metrics.jsonl, best and last checkpoints (default: exp/demo-<num_layers>l-train)")
    t.add_argument("--train_data_dir", type=Path, default=None, help=f"default: {DEMO_CORPUS_DIR}/train")
    t.add_argument("--dev_data_dir", type=Path, default=None, help=f"default: {DEMO_CORPUS_DIR}/dev")
    t.add_argument("--steps", type=int, default=9000, help="optimizer steps (default: %(default)s)")
    t.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=300, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--max_seconds", type=float, default=16.0, help="padded audio seconds per batch (default: %(default)s)")
    t.add_argument("--eval_every", type=int, default=500, help="steps between dev evaluations (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from <exp_dir>/last if present")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output model written by comflp")
    t.add_argument("--pad_audio", action="store_true",
                   help="train on zero-padded batches through the feature encoder (how demo-12l was trained); "
                        "default: each utterance's conv features computed unpadded, as comflp decodes")
    w = sub.add_parser("whisper-init", help="the demo Whisper's random start (Whisper architecture, character "
                                            "vocabulary, 4-s window); `comflp finetune --whole_model` "
                                            "trains it")
    w.add_argument("--output", type=Path, default=EXP_DIR / "demo-whisper-train" / "init",
                   help="model dir (default: %(default)s)")
    w.add_argument("--encoder_layers", type=positive_int, default=4, help="(default: %(default)s)")
    w.add_argument("--decoder_layers", type=positive_int, default=4, help="(default: %(default)s)")
    w.add_argument("--d_model", type=positive_int, default=192, help="width (default: %(default)s)")
    w.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    w.add_argument("--overwrite", action="store_true", help="replace an earlier comflp output at --output")
    s = sub.add_parser("ship", help="save a trained model as a shipped demo model: float16 safetensors with its "
                                    "processor and generation config (the demo Whisper's last step before its card)")
    s.add_argument("--model", type=Path, required=True, help="the trained model dir, e.g. <exp>/model_avg")
    s.add_argument("--output", type=Path, default=DEMO_WHISPER_DIR, help="(default: %(default)s)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier comflp output at --output")
    c = sub.add_parser("card", help="measure the shipped model and write its model card (README.md)")
    c.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="model dir (default: %(default)s)")
    c.add_argument("--exp_dir", type=Path, default=None, help="training exp dir (default: exp/<model name>-train)")
    c.add_argument("--no_search", action="store_true",
                   help="leave CoMFLP's and GLP's picks out of the pruning table (GLP takes minutes)")
    c.add_argument("--batch_size", type=int, default=32, help="decoding batch size (default: %(default)s)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        if args.output is None:
            args.output = demo_model_dir(args.num_layers)
        if args.exp_dir is None:
            args.exp_dir = EXP_DIR / f"demo-{args.num_layers}l-train"
        if args.steps <= args.warmup:
            raise ComflpError(f"--steps {args.steps} must exceed --warmup {args.warmup}")
        train(args)
    elif args.command == "whisper-init":
        print(whisper_init(args))
    elif args.command == "ship":
        print(ship(args.model, args.output, overwrite=args.overwrite))
    else:
        from .card import write_card

        write_card(args.model, args.exp_dir or EXP_DIR / f"{Path(args.model).name}-train", batch_size=args.batch_size,
                   search_picks=not args.no_search)


if __name__ == "__main__":
    main()
