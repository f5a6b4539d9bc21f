"""The embedded synthetic corpora: Mandarin ("mini-AISHELL", the default) and English.

Sentences of 4-10 characters are drawn Zipf-weighted from a vocabulary of
Mandarin characters with pairwise distinct espeak-ng pronunciations (random
text over homophones would be unlearnable), spoken by espeak-ng's ``cmn``
voice under disjoint synthetic speakers (voice variant, pitch, range, rate),
with per-utterance prosody jitter, silence trimming, random gain and white
noise at 15-35 dB SNR, resampled to 16 kHz mono 16-bit PCM.

Dev and test speakers are disjoint from the training speakers (their own
pitch, range and rate) but use voice variants heard in training.

The English corpus (``language="en"``, for English checkpoints such as
Whisper ``.en``) differs only in its text and voices: sentences from a small
seeded grammar (:mod:`comflp.demo.english`) spoken by espeak-ng's English
accents (American, British, RP, Scottish, New York, Caribbean, …), each
speaker one accent with its own prosody, utterance ids ``SYNEN0S0001W0001``,
less noise (25-40 dB SNR). Its speakers use espeak's plain accent voices and
a narrower prosody range than the Mandarin ones: a real Whisper tiny.en
misrecognised 52% of the words of the same sentences with voice variants
and 67% with the Mandarin prosody ranges, against 43% with plain voices
(48 utterances each; trying checkpoints needs a model that works unpruned).

Output: Kaldi dirs ``{out}/{train,dev,test}/`` (``wav.scp``, ``text``,
``utt2spk``, ``spk2utt``) with utterance ids in AISHELL-1's style
(``SYN000S0001W0001``) and audio under ``{out}/wav/<split>/<speaker>/``.
``wav.scp`` paths are relative to the Kaldi dir so the tree can be moved.

Everything is a function of the seed (and the pinned espeakng-loader
version): the same seed writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from .. import atomic
from ..artifacts import dir_kind, mark_dir, write_dir
from .layout import corpus_manifest
from ..data import Utterance, is_corpus_dir, read_corpus_dir, write_corpus_dir
from ..errors import ComflpError, exit_on_error
from ..cli.argtypes import positive_int, seed
from ..cli.argtypes import ArgumentParser, add_overwrite
from ..paths import DEMO_CORPUS_DIRS, demo_corpus_dir
from . import english
from .tts import Espeak, Voice

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
LANGUAGES = ("zh", "en")  # the embedded corpora: Mandarin (the paper's language) and English

# Frequent Mandarin characters, most frequent first; the homophone filter
# keeps the first character of each pronunciation.
COMMON_CHARS = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小"
    "么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样"
    "现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便"
    "位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场"
    "师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界"
    "及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术"
    "结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深"
    "区即求品士转空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友"
    "孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切支注母"
    "格装依易帮病哪河乐午雪晚鱼鸟猫狗羊牛米茶酒汤饭菜糖盐油蛋果树草叶云雨冰春夏秋冬晨夜灯窗桌椅杯碗船桥湖岛沙"
    "村街楼店票钟表笔纸布衣鞋帽包伞球歌舞画琴棋诗梦福寿喝睡醒跑跳坐躺唱哭买卖借还送寄洗穿脱开关冷热酸甜苦辣香"
    "臭软硬胖瘦高矮宽窄厚薄早迟忙闲新旧老少"
)

# espeak-ng voice variants whose output is a function of the input alone: f2, f3 and f5
# add breath noise from a time-seeded generator (two runs a second apart differ), so
# the deterministic "aunty", "steph" and "shelby" stand in their places.
VOICE_VARIANTS = (
    "f1", "aunty", "steph", "f4", "shelby", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "Andy", "Annie", "anika", "belinda", "david", "ed", "Gene", "linda", "max",
)


@dataclass(frozen=True)
class CorpusConfig:
    """Language, sizes and randomness of a synthetic corpus (:meth:`for_language` gives each language's
    defaults; ``vocab_size``, ``zipf_exponent`` and the character counts shape the Mandarin text only)."""

    seed: int = 20230801
    num_train: int = 3600
    num_dev: int = 200
    num_test: int = 200
    speakers_train: int = 24
    speakers_dev: int = 3
    speakers_test: int = 3
    vocab_size: int = 300
    zipf_exponent: float = 1.0
    min_chars: int = 4
    max_chars: int = 10
    snr_db: tuple[float, float] = (15.0, 35.0)
    language: str = "zh"

    def __post_init__(self) -> None:
        object.__setattr__(self, "snr_db", tuple(self.snr_db))  # JSON round trips give lists
        if self.language not in LANGUAGES:
            raise ComflpError(f"no embedded corpus in language {self.language!r} (choose from {', '.join(LANGUAGES)})")

    @classmethod
    def for_language(cls, language: str, **changes) -> "CorpusConfig":
        """The defaults of the ``language`` corpus, with ``changes``. English has fewer, longer utterances
        (it is for trying pretrained checkpoints, not for training a model from scratch) and a dev and a test
        speaker per accent."""
        if language == "en":
            changes = {"num_train": 1000, "speakers_dev": len(english.ACCENTS), "speakers_test": len(english.ACCENTS),
                       "snr_db": (25.0, 40.0), **changes}
        return cls(language=language, **changes)


def distinct_pronunciations(chars: str, espeak: Espeak | None = None) -> list[str]:
    """Keep the first character of each distinct espeak-ng pronunciation.

    Characters espeak spells out letter by letter or leaves silent (an empty
    or multi-syllable phoneme string) are dropped too.
    """
    espeak = espeak or Espeak.get()
    seen: set[str] = set()
    kept: list[str] = []
    for ch in dict.fromkeys(chars):  # ordered de-duplication
        ph = espeak.phonemes(ch)
        if not ph or " " in ph or ph in seen:
            continue
        seen.add(ph)
        kept.append(ch)
    return kept


def _speakers(cfg: CorpusConfig, rng: np.random.Generator) -> dict[str, list[tuple[str, Voice]]]:
    counts = {"train": cfg.speakers_train, "dev": cfg.speakers_dev, "test": cfg.speakers_test}
    speakers: dict[str, list[tuple[str, Voice]]] = {}
    index = 0
    for split in SPLITS:
        speakers[split] = []
        for _ in range(counts[split]):
            index += 1
            if cfg.language == "en":
                voice = english.speaker(len(speakers[split]), rng)
                speakers[split].append((f"S{index:04d}", voice))
                continue
            # Train speakers cycle through every variant; dev/test speakers are new
            # prosody settings on variants heard in training (a new voice, not a new timbre:
            # 16-24 timbres are too few to generalise to an unheard one).
            if split == "train":
                variant = VOICE_VARIANTS[(index - 1) % len(VOICE_VARIANTS)]
            else:
                variant = VOICE_VARIANTS[int(rng.integers(len(VOICE_VARIANTS)))]
            voice = Voice(
                name=f"cmn+{variant}",
                rate=int(rng.integers(140, 200)),
                pitch=int(rng.integers(25, 75)),
                range=int(rng.integers(25, 85)),
            )
            speakers[split].append((f"S{index:04d}", voice))
    return speakers


def _trim_silence(wave: np.ndarray, sample_rate: int, *, threshold: float = 0.02, margin_s: float = 0.05) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wave) > threshold * max(np.abs(wave).max(), 1e-9))
    if loud.size == 0:
        return wave
    margin = int(margin_s * sample_rate)
    return wave[max(loud[0] - margin, 0): loud[-1] + margin + 1]


def synthesize_utterance(text: str, voice: Voice, rng: np.random.Generator, cfg: CorpusConfig,
                         espeak: Espeak | None = None) -> np.ndarray:
    """One noisy 16 kHz float32 utterance of ``text`` by ``voice`` with jitter from ``rng``."""
    espeak = espeak or Espeak.get()
    jittered = Voice(
        name=voice.name,
        rate=int(np.clip(voice.rate + rng.integers(-15, 16), 80, 260)),
        pitch=int(np.clip(voice.pitch + rng.integers(-6, 7), 0, 100)),
        range=int(np.clip(voice.range + rng.integers(-8, 9), 0, 100)),
    )
    raw = espeak.synth(text, jittered).astype(np.float32) / 32768.0
    raw = _trim_silence(raw, espeak.sample_rate)
    wave = soxr.resample(raw, espeak.sample_rate, SAMPLE_RATE).astype(np.float32)
    wave *= rng.uniform(0.25, 0.9) / max(float(np.abs(wave).max()), 1e-6)
    snr = rng.uniform(*cfg.snr_db)
    noise_rms = np.sqrt(np.mean(wave**2)) / (10 ** (snr / 20))
    wave = wave + rng.standard_normal(wave.shape).astype(np.float32) * noise_rms
    return np.clip(wave, -1.0, 1.0)


def generate(out_dir: str | Path, cfg: CorpusConfig = CorpusConfig(), *, progress: bool = True,
             overwrite: bool = False) -> Path:
    """Write the corpus to ``out_dir`` atomically (built in a temp dir, then renamed).

    Returns ``out_dir``. An existing ``out_dir`` is replaced only if comflp wrote it and ``overwrite`` is
    set; a dir comflp did not write is never touched (:func:`comflp.artifacts.write_dir`). Synthesis runs
    in a fresh Python process: espeak-ng carries state from one utterance to
    the next (output lengths drift by a sample) that even ``espeak_Terminate``
    does not reset, so only a fresh library gives the same bytes for the same
    seed, whatever the calling process synthesised before.
    """
    out_dir = Path(out_dir)
    _adopt_earlier_corpus(out_dir)
    with write_dir(out_dir, kind="corpus", overwrite=overwrite, flag="--output") as tmp_root:
        code = ("import json, sys; from pathlib import Path; from comflp.demo.corpus import CorpusConfig, "
                "_synthesize_corpus; a = json.loads(sys.argv[1]); "
                "_synthesize_corpus(Path(a['root']), CorpusConfig(**a['cfg']), a['progress'])")
        payload = json.dumps({"root": str(tmp_root), "cfg": asdict(cfg), "progress": progress})
        done = subprocess.run([sys.executable, "-c", code, payload])
        if done.returncode != 0:
            raise ComflpError(f"corpus synthesis failed (exit {done.returncode}); see the messages above")
    return out_dir


def _adopt_earlier_corpus(root: Path) -> None:
    """Mark a corpus that comflp generated before corpora carried the ownership mark (it has comflp's manifest
    at its root), so that ``--overwrite`` may replace it like any other comflp output."""
    if root.is_dir() and dir_kind(root) is None:
        try:
            manifest = json.loads(corpus_manifest(root).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(manifest, dict) and {"config", "espeakng_loader", "vocab"} <= set(manifest):
            mark_dir(root, "corpus")


def _mandarin_text(cfg: CorpusConfig, espeak: Espeak):
    """The Mandarin vocabulary and a sentence drawer: 4-10 characters, Zipf-weighted."""
    vocab = distinct_pronunciations(COMMON_CHARS, espeak)
    if len(vocab) < cfg.vocab_size:
        raise ComflpError(f"only {len(vocab)} characters with distinct pronunciations; vocab_size={cfg.vocab_size} too large")
    vocab = vocab[: cfg.vocab_size]
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** cfg.zipf_exponent
    weights /= weights.sum()

    def draw(rng: np.random.Generator) -> str:
        n_chars = int(rng.integers(cfg.min_chars, cfg.max_chars + 1))
        return "".join(rng.choice(vocab, size=n_chars, p=weights))

    return "".join(vocab), draw


def _synthesize_corpus(root: Path, cfg: CorpusConfig, progress: bool) -> None:
    espeak = Espeak.get()
    if cfg.language == "zh":
        vocab, draw = _mandarin_text(cfg, espeak)
    else:
        vocab, draw = " ".join(english.vocabulary()), english.sentence
    prefix = "SYN000" if cfg.language == "zh" else "SYNEN0"
    speakers = _speakers(cfg, np.random.default_rng(cfg.seed))
    sizes = {"train": cfg.num_train, "dev": cfg.num_dev, "test": cfg.num_test}
    for split_index, split in enumerate(SPLITS):
        kaldi = root / split
        kaldi.mkdir(parents=True)
        rows: list[tuple[str, str, str, str]] = []  # utt, relative wav, text, speaker
        spk_list = speakers[split]
        counters = {spk: 0 for spk, _ in spk_list}
        for i in tqdm(range(sizes[split]), desc=f"synthesising {split}", disable=not progress, unit="utt"):
            rng = np.random.default_rng([cfg.seed, split_index, i])
            spk, voice = spk_list[i % len(spk_list)]
            counters[spk] += 1
            text = draw(rng)
            utt = f"{prefix}{spk}W{counters[spk]:04d}"
            wave = synthesize_utterance(text, voice, rng, cfg, espeak)
            rel = Path("..") / "wav" / split / spk / f"{utt}.wav"
            wav_path = kaldi / rel
            wav_path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(wav_path, wave, SAMPLE_RATE, subtype="PCM_16")
            rows.append((utt, rel.as_posix(), text, spk))
        rows.sort()
        write_corpus_dir(kaldi, rows)
    manifest = {
        "config": asdict(cfg),
        "espeakng_loader": metadata.version("espeakng-loader"),
        "vocab": vocab,
        "speakers": {split: {spk: asdict(v) for spk, v in spk_list} for split, spk_list in speakers.items()},
    }
    atomic.write_json(corpus_manifest(root), manifest)


def ensure_demo_corpus(data_dir: str | Path) -> None:
    """Generate an embedded corpus (Mandarin or English) if ``data_dir`` is one of its missing splits.

    Any other missing directory is left alone (the data reader names it).
    """
    data_dir = Path(data_dir).resolve()
    for language, root in DEMO_CORPUS_DIRS.items():
        root = root.resolve()
        if data_dir.parent == root and data_dir.name in SPLITS and not is_corpus_dir(data_dir):
            log.info("embedded %s corpus missing at %s: generating it (about a minute)", language, root)
            # a comflp corpus with a split missing is made anew; a dir comflp did not write is refused
            generate(root, CorpusConfig.for_language(language), overwrite=True)


def read_corpus(data_dir: str | Path, *, require_text: bool = True) -> list[Utterance]:
    """Read a corpus dir named on the command line, a bench or the demo; the embedded corpus is generated first
    when ``data_dir`` is one of its missing splits (:func:`ensure_demo_corpus`).

    Generating the demo corpus is a convenience of the default data dirs; the data layer itself only reads
    (:func:`comflp.data.read_corpus_dir`).
    """
    ensure_demo_corpus(data_dir)
    return read_corpus_dir(data_dir, require_text=require_text)


def build_parser() -> argparse.ArgumentParser:
    zh, en = CorpusConfig.for_language("zh"), CorpusConfig.for_language("en")
    p = ArgumentParser(
        prog="comflp corpus",
        description="Generate an embedded synthetic corpus in Kaldi dirs: Mandarin (AISHELL-1 layout, the "
                    "default) or English (for English checkpoints such as Whisper .en).",
    )
    p.add_argument("--language", choices=LANGUAGES, default="zh",
                   help="zh: Mandarin characters, cmn voices; en: English sentences, espeak-ng's English accents "
                        "(default: %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help="root dir; train/dev/test Kaldi dirs are written below it (default: "
                        f"{demo_corpus_dir('zh')} for zh, {demo_corpus_dir('en')} for en: where commands look "
                        "for the embedded corpus)")
    add_overwrite(p, "corpus dir")
    p.add_argument("--seed", type=seed, default=zh.seed, help="random seed; the same seed gives identical files (default: %(default)s)")
    p.add_argument("--num_train", type=positive_int, default=None,
                   help=f"train utterances (default: {zh.num_train} zh, {en.num_train} en)")
    p.add_argument("--num_dev", type=positive_int, default=None, help=f"dev utterances (default: {zh.num_dev})")
    p.add_argument("--num_test", type=positive_int, default=None, help=f"test utterances (default: {zh.num_test})")
    p.add_argument("--speakers", type=positive_int, nargs=3, metavar=("TRAIN", "DEV", "TEST"), default=None,
                   help="disjoint speakers per split (default: "
                        f"{zh.speakers_train} {zh.speakers_dev} {zh.speakers_test} zh, "
                        f"{en.speakers_train} {en.speakers_dev} {en.speakers_test} en)")
    p.add_argument("--vocab_size", type=positive_int, default=None,
                   help=f"Mandarin only: characters in the vocabulary (default: {zh.vocab_size})")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.vocab_size is not None and args.language != "zh":
        raise ComflpError("--vocab_size shapes the Mandarin corpus only; the English one has its own word lists")
    given = {"num_train": args.num_train, "num_dev": args.num_dev, "num_test": args.num_test,
             "vocab_size": args.vocab_size}
    if args.speakers is not None:
        given.update(zip(("speakers_train", "speakers_dev", "speakers_test"), args.speakers))
    cfg = CorpusConfig.for_language(args.language, seed=args.seed,
                                    **{k: v for k, v in given.items() if v is not None})
    output = args.output if args.output is not None else demo_corpus_dir(args.language)
    out = generate(output, cfg, overwrite=args.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
