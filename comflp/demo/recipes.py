"""Recipes for the embedded demo models ``models/demo-12l``, ``models/demo-24l``, ``models/demo-whisper`` and
``models/demo-speechllm``.

``python -m comflp.demo train [--num_layers 24]`` trains a small wav2vec2-style
CTC model (12 layers unless told) from scratch on the embedded synthetic corpus (generated if missing);
``python -m comflp.demo whisper-init`` makes the demo Whisper's random start and ``python -m comflp.demo
speechllm-init`` the demo speech-LLM's start (the demo Whisper's encoder as its audio tower), which
``comflp finetune --whole_model`` trains; ``python -m comflp.demo ship`` saves a trained model as shipped (float16);
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
import logging
import math
from pathlib import Path

import torch
from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                          WhisperConfig, WhisperFeatureExtractor)
from transformers.models.wav2vec2.tokenization_wav2vec2 import VOCAB_FILES_NAMES

from .. import atomic
from ..cli.argtypes import non_negative_int, positive_float, positive_int, seed, threads
from ..cli.options import ArgumentParser
from .corpus import read_corpus
from ..errors import ComflpError, exit_on_error
from ..finetune import FinetuneConfig, run_settings, train as train_loop
from ..logs import setup_logging
from ..artifacts import ExperimentDir, claim_dir
from .layout import RecipeDir
from ..model import save_model
from ..paths import (DEMO_CORPUS_DIR, DEMO_MODEL_DIR, DEMO_SPEECHLLM_DIR, DEMO_WHISPER_DIR, demo_model_dir, demo_split,
                     exp_dir)

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
    vocab_file = out_dir / VOCAB_FILES_NAMES["vocab_file"]
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


# the demo speech-LLM's chat: Qwen's ChatML turns, the audio between Qwen2-Audio's markers, no system turn
SPEECHLLM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>",
                            "<|audio_eos|>", "<unk>")
SPEECHLLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_speechllm_processor(vocab: str, feature_extractor):
    """Qwen2-Audio's processor for the demo speech-LLM: ``feature_extractor`` (the demo Whisper's 4-s window),
    a character tokenizer (Qwen's chat and audio tokens, printable ASCII for the chat's own words, then the
    corpus's characters) and :data:`SPEECHLLM_CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor

    ascii_chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = list(SPEECHLLM_SPECIAL_TOKENS) + ascii_chars + [c for c in vocab if c not in ascii_chars]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPEECHLLM_SPECIAL_TOKENS[1:6])})
    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tok, chat_template=SPEECHLLM_CHAT_TEMPLATE)


def speechllm_init(args: argparse.Namespace) -> Path:
    """The demo speech-LLM's start: Qwen2-Audio's architecture, its audio tower the demo Whisper's trained encoder
    (same shape, its weights copied), a random projector and a small random Qwen2 LLM over a character
    vocabulary; ``comflp finetune --whole_model`` trains it."""
    from transformers import GenerationConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from ..model import load_model, save_model

    whisper = load_model(args.whisper, need_tokenizer=True, allow_encoder_decoder=True)
    wcfg = whisper.model.config
    vocab = "".join(t for t in whisper.tokenizer.get_vocab() if len(t) == 1)
    processor = build_speechllm_processor(vocab, whisper.feature_extractor)
    tok = processor.tokenizer
    d = args.d_model
    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=wcfg.num_mel_bins, d_model=wcfg.d_model,
                          encoder_layers=wcfg.encoder_layers, encoder_attention_heads=wcfg.encoder_attention_heads,
                          encoder_ffn_dim=wcfg.encoder_ffn_dim, max_source_positions=wcfg.max_source_positions,
                          dropout=0.1, activation_function=wcfg.activation_function),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=d, intermediate_size=4 * d,
                         num_hidden_layers=args.llm_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>")),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(args.seed)
    model = Qwen2AudioForConditionalGeneration(config)
    tower = {k.removeprefix("model.encoder."): v for k, v in whisper.model.state_dict().items()
             if k.startswith("model.encoder.")}
    missing, unexpected = model.model.audio_tower.load_state_dict(tower, strict=False)
    if missing or unexpected:
        raise ComflpError(f"{args.whisper}: its encoder is not the tower's shape (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.generation_config = GenerationConfig(bos_token_id=config.text_config.bos_token_id,
                                               eos_token_id=[tok.eos_token_id, tok.pad_token_id],
                                               pad_token_id=tok.pad_token_id)
    out = save_model(model, args.output, tokenizer=processor, overwrite=args.overwrite)
    log.info("demo speech-LLM start: %d parameters (tower from %s), vocab %d -> %s",
             sum(p.numel() for p in model.parameters()), args.whisper, len(tok), out)
    return out


def ship(model: Path, output: Path, *, overwrite: bool = False) -> Path:
    """``model`` saved to ``output`` in float16 with its processor (what the shipped demo models are)."""
    from ..model import load_model, save_model

    loaded = load_model(model, need_tokenizer=True, allow_encoder_decoder=True)
    out = save_model(loaded.model, output, feature_extractor=loaded.feature_extractor, tokenizer=loaded.tokenizer,
                     dtype=torch.float16, overwrite=overwrite)
    log.info("shipped %s as float16 -> %s", model, out)
    return out


def training_config(args: argparse.Namespace, init: Path) -> FinetuneConfig:
    """The demo CTC model's recipe as a run of the one training loop (:func:`comflp.finetune.train`): the whole
    model from its random start ``init``, AdamW (betas 0.9/0.98, weight decay 0.01), ``--warmup`` linear
    warm-up updates then cosine decay to 0 at ``--steps``, length-sorted batches of at most ``--max_seconds``
    of padded audio, clipping at 5, no LayerDrop; validated on the whole dev split after every epoch (and
    where training stops), its best checkpoint kept (``best/``)."""
    dev = read_corpus(args.dev_data_dir)
    return FinetuneConfig(
        model=str(init), whole_model=True, output_dir=Path(args.exp_dir), train_data_dir=args.train_data_dir,
        valid_data_dir=args.dev_data_dir, max_batch_seconds=args.max_seconds, grad_accum=1, lr=args.lr,
        schedule="cosine", warmup_updates=args.warmup, adam_beta2=0.98, weight_decay=0.01, layerdrop=0.0,
        max_grad_norm=5.0, epochs=10 ** 6, max_updates=args.steps, valid_batch_size=32,
        test_num_batch=math.ceil(len(dev) / 32), keep_best=True, pad_audio=args.pad_audio, seed=args.seed,
        threads=args.threads, resume_epoch=-1 if args.resume else 0, quiet=False)


def train(args: argparse.Namespace) -> Path:
    """Train the demo CTC model with the fine-tuning loop and ship its best checkpoint in float16.

    The random start is saved to ``<exp_dir>/init-<L>l`` (deterministic from the seed), so a run resumed with
    another depth is refused as another experiment.
    """
    exp = Path(args.exp_dir)
    claim_dir(args.output, overwrite=args.overwrite)  # refuse now, not after hours of training
    init = RecipeDir(exp).init(args.num_layers)
    config = training_config(args, init)
    # --resume continues only the same recipe; without it the run starts over
    ExperimentDir.open(exp, settings=run_settings(config, []), kind="finetune", afresh=not args.resume,
                       flag="--exp_dir", restart_flags="no --resume")
    setup_logging(ExperimentDir(exp).command_log("train"))
    torch.set_num_threads(args.threads)
    train_utts = read_corpus(args.train_data_dir)
    vocab = "".join(sorted({c for u in train_utts for c in u.text if not c.isspace()}))
    fe, tok = build_processor(vocab, RecipeDir(exp).processor)
    torch.manual_seed(args.seed)
    model = Wav2Vec2ForCTC(demo_config(len(tok), num_layers=args.num_layers))
    save_model(model, init, feature_extractor=fe, tokenizer=tok, overwrite=True)
    log.info("model: %d parameters, vocab %d; random start -> %s", sum(p.numel() for p in model.parameters()),
             len(tok), init)
    run = ExperimentDir(train_loop(config))
    if not run.best.is_dir():
        raise ComflpError(f"no best checkpoint in {run.root}: training was not validated")
    out = ship(run.best, args.output, overwrite=args.overwrite)
    best = min(r["valid_cer"] for r in run.read_metrics() if r["epoch"] > 0)
    log.info("best dev CER %.2f%%; shipped fp16 model to %s", 100 * best, out)
    return out


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
    t.add_argument("--steps", type=positive_int, default=9000, help="optimizer steps (default: %(default)s)")
    t.add_argument("--lr", type=positive_float, default=5e-4, help="peak learning rate (default: %(default)s)")
    t.add_argument("--warmup", type=non_negative_int, default=300, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--max_seconds", type=positive_float, default=16.0, help="padded audio seconds per batch (default: %(default)s)")
    t.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    t.add_argument("--threads", type=threads, default=2, help="torch CPU threads (default: %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue from <exp_dir>/last if present")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --output model written by comflp")
    t.add_argument("--pad_audio", action="store_true",
                   help="train on zero-padded batches through the feature encoder (how demo-12l was trained); "
                        "default: each utterance's conv features computed unpadded, as comflp decodes")
    w = sub.add_parser("whisper-init", help="the demo Whisper's random start (Whisper architecture, character "
                                            "vocabulary, 4-s window); `comflp finetune --whole_model` "
                                            "trains it")
    w.add_argument("--output", type=Path, default=RecipeDir.of(exp_dir(), DEMO_WHISPER_DIR.name).init(),
                   help="model dir (default: %(default)s)")
    w.add_argument("--encoder_layers", type=positive_int, default=4, help="(default: %(default)s)")
    w.add_argument("--decoder_layers", type=positive_int, default=4, help="(default: %(default)s)")
    w.add_argument("--d_model", type=positive_int, default=192, help="width (default: %(default)s)")
    w.add_argument("--seed", type=seed, default=0, help="(default: %(default)s)")
    w.add_argument("--overwrite", action="store_true", help="replace an earlier comflp output at --output")
    q = sub.add_parser("speechllm-init", help="the demo speech-LLM's start (Qwen2-Audio's architecture: the demo "
                                              "Whisper's encoder as its audio tower, a small Qwen2 LLM over "
                                              "characters); `comflp finetune --whole_model` trains it")
    q.add_argument("--whisper", type=Path, default=DEMO_WHISPER_DIR,
                   help="the Whisper whose encoder becomes the audio tower (default: %(default)s)")
    q.add_argument("--output", type=Path, default=RecipeDir.of(exp_dir(), DEMO_SPEECHLLM_DIR.name).init(),
                   help="model dir (default: %(default)s)")
    q.add_argument("--llm_layers", type=positive_int, default=4, help="the LLM's layers (default: %(default)s)")
    q.add_argument("--d_model", type=positive_int, default=192, help="the LLM's width (default: %(default)s)")
    q.add_argument("--seed", type=seed, default=0, help="(default: %(default)s)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier comflp output at --output")
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
    c.add_argument("--batch_size", type=positive_int, default=32, help="decoding batch size (default: %(default)s)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        if args.output is None:
            args.output = demo_model_dir(args.num_layers)
        if args.exp_dir is None:
            args.exp_dir = RecipeDir.of(exp_dir(), demo_model_dir(args.num_layers).name).root
        args.train_data_dir = args.train_data_dir or demo_split("train")
        args.dev_data_dir = args.dev_data_dir or demo_split("dev")
        if args.steps <= args.warmup:
            raise ComflpError(f"--steps {args.steps} must exceed --warmup {args.warmup}")
        train(args)
    elif args.command == "whisper-init":
        print(whisper_init(args))
    elif args.command == "speechllm-init":
        print(speechllm_init(args))
    elif args.command == "ship":
        print(ship(args.model, args.output, overwrite=args.overwrite))
    else:
        from .card import write_card

        write_card(args.model, args.exp_dir or RecipeDir.of(exp_dir(), Path(args.model).name).root,
                   batch_size=args.batch_size,
                   search_picks=not args.no_search)


if __name__ == "__main__":
    main()
